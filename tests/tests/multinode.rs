//! Jobs that span nodes, on a real multi-node Slurm (`scripts/slurm-cluster up --nodes 3`: three
//! slurmd, each in its own network, UTS and mount namespace) with one real `ergond` per node, each
//! on its own fake GPUs (distinct UUIDs and powers), its own generated RAPL tree, socket, journal,
//! spool and `/metrics` port.
//!
//! - `a_two_node_job_is_one_record_with_a_per_node_split`: `sbatch -N2 --gres=gpu:2
//!   --energy-report` with `srun` steps across both nodes: each node's ergond writes its manifest
//!   (the batch step on one node only, the srun steps on both), each GPU at its known power × the
//!   node's interval; the third node writes nothing; `ergon run` over all three spools writes ONE
//!   record (`nodes=2`, `ngpu=4`, the sum of the nodes) into AdminComment and uploads it once to a
//!   real VictoriaMetrics (every series of the job one sample), a second run changes nothing; `ergon report` shows the per-node split; the user's report on each node says that
//!   it covers that node of a 2-node job and points at `ergon report`.
//! - `a_three_node_job_collected_late_is_updated_once`: a 3-node job; the first `ergon run` sees
//!   two nodes' spools (the third node's spool is "late"), writes a record that says 2 of 3 nodes
//!   reported; the next run, with the late spool, replaces it once with `nodes=3`; a third run
//!   (every spool collected twice) changes nothing.
//! - `ergond_down_on_one_node_the_record_names_it`: ergond of one node is down for a whole 2-node
//!   job: the other node's manifest is collected, and the record says which node did not report
//!   and that the job is incomplete; nothing is invented for the missing node.
//! - `ergond_restarted_mid_job_on_one_node_recovers_its_gap`: ergond of one node of a running
//!   2-node job is SIGKILLed and restarted: that node's manifest has one recovered gap and its
//!   GPUs' energy within 2 % of power × time, the other node's none; one complete record.
//! - `a_node_that_dies_mid_job_leaves_an_incomplete_record`: every process of one node of a
//!   running 2-node job (slurmd, the job's slurmstepd and tasks) is killed and Slurm told the node
//!   is down: the job ends `NODE_FAIL`, the surviving node's manifest is collected, the record
//!   says 1 of 2 nodes (`nexp=2`) and `ergon report` names the dead node; the node is brought back
//!   (`slurm-cluster up`) at the end, also on failure.
//!
//! These need a cluster of at least two nodes; on the one-node cluster the other end-to-end tests
//! use, each says `SKIPPED` and returns. `scripts/test` brings a 3-node 22.05 cluster up for them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ergon_protocol::{read_frame, write_frame, Manifest, Reply, Request, StepId};
use ergon_testkit::{PowercapLayout, PowercapTree};
use ergon_tests::{cluster, scratch_dir, target_dir, wait_for, Cluster, TempDir, JOB_TIMEOUT};

static SERIAL: Mutex<()> = Mutex::new(());

/// How long ergond may take to write a manifest after the job ended.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Relative error allowed on a GPU's energy against its power × the node's job interval (the
/// counter moves in 20 ms steps; a 3 s job).
const ENERGY_TOLERANCE: f64 = 0.01;

/// The fake GPU counter's update period.
const COUNTER_PERIOD_MS: f64 = 20.0;

/// Power of the generated RAPL package and DRAM zones of every node, watts.
const PACKAGE_W: f64 = 50.0;
const DRAM_W: f64 = 10.0;

/// Power of fake NVML device `nvml_index` on node number `node` (1-based): every GPU of the
/// cluster has its own, so a figure from the wrong node or GPU shows.
fn watts(node: usize, nvml_index: usize) -> f64 {
    100.0 * (nvml_index as f64 + 1.0) + 10.0 * node as f64
}

/// Device minor of the cluster's `dev/fakegpu<i>` (gres.conf's GPU `i`, on every node).
fn minor_of(c: &Cluster, i: u32) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(c.dir.join(format!("dev/fakegpu{i}")))
        .expect("the cluster's fake GPU devices")
        .rdev();
    ((rdev & 0xff) | ((rdev >> 12) & !0xff)) as u32
}

/// One fake NVML device of a node.
#[derive(Debug, Clone)]
struct FakeGpu {
    uuid: String,
    minor: u32,
    watts: f64,
}

/// One node's ergond: the real binary on its own fake NVML library and RAPL tree, listening on
/// the node's socket (`nodes/<node>/run/`, which the node's slurmd sees as the plugin's socket
/// path), with its pid in `nodes/<node>/ergond.pid` for `slurm-cluster status` and `down`.
struct NodeErgond {
    node: String,
    gpus: Vec<FakeGpu>,
    rapl: Arc<AtomicBool>,
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    socket: PathBuf,
    pidfile: PathBuf,
    metrics: String,
    spool: PathBuf,
}

impl NodeErgond {
    /// Configure node `number`'s (1-based) ergond under `dir` and start it.
    fn start(c: &Cluster, number: usize, dir: &Path) -> Result<NodeErgond> {
        let node = c.nodes[number - 1].clone();
        let dir = dir.join(&node);
        std::fs::create_dir_all(&dir)?;
        let built = target_dir().join("debug/libnvidia_ml.so");
        ensure!(
            built.exists(),
            "{} is missing: build it first (cargo build -p fake-nvml)",
            built.display()
        );
        let lib = dir.join("nvml/libnvidia-ml.so.1");
        std::fs::create_dir_all(lib.parent().unwrap())?;
        std::fs::copy(&built, &lib)?;
        // NVML order: gres.conf's devices reversed, so that only matching by minor is right.
        let gpus: Vec<FakeGpu> = (0..4u32)
            .rev()
            .enumerate()
            .map(|(i, slurm)| {
                let minor = minor_of(c, slurm);
                FakeGpu {
                    uuid: format!("GPU-{number:02x}{minor:06x}-0000-4000-8000-{i:012x}"),
                    minor,
                    watts: watts(number, i),
                }
            })
            .collect();
        let scenario = serde_json::json!({
            "start_monotonic_ns": ergond::clock::monotonic_ns(),
            "gpus": gpus.iter().map(|g| serde_json::json!({
                "uuid": g.uuid, "name": format!("Fake GPU of {node}"), "minor": g.minor,
                "profile": {"kind": "constant", "watts": g.watts},
                "update_period_ms": COUNTER_PERIOD_MS,
            })).collect::<Vec<_>>(),
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
        let rapl = Arc::new(AtomicBool::new(false));
        {
            let stop = Arc::clone(&rapl);
            let (pkg, dram) = (
                powercap.join("intel-rapl:0/energy_uj"),
                powercap.join("intel-rapl:0:0/energy_uj"),
            );
            std::thread::spawn(move || {
                let t0 = Instant::now();
                while !stop.load(Ordering::Relaxed) {
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
        let run = c.dir.join("nodes").join(&node).join("run");
        ensure!(
            run.is_dir(),
            "{} is missing: is this a multi-node cluster?",
            run.display()
        );
        let socket = run.join("ergon-test.sock");
        // A fresh ergond replays only what its own test queues.
        match std::fs::remove_dir_all(run.join("queue")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let config = dir.join("ergond.toml");
        std::fs::write(
            &config,
            format!(
                "nvml_library = {}\npowercap_root = {}\nperf_sysfs_root = {}\nprefer_perf = false\n\
                 cgroup_root = \"/sys/fs/cgroup\"\nproc_root = \"/proc\"\nsocket_path = {}\n\
                 state_dir = {}\nspool_dir = {}\nmetrics_listen = \"127.0.0.1:{port}\"\n\
                 node_name = {node:?}\ngres_conf = {}\nprivate_data = \"no\"\n",
                q(&lib),
                q(&powercap),
                q(&dir.join("no-perf")),
                q(&socket),
                q(&dir.join("state")),
                q(&spool),
                q(&c.dir.join("etc/gres.conf")),
            ),
        )?;
        let mut e = NodeErgond {
            node,
            gpus,
            rapl,
            child: None,
            config,
            log: dir.join("ergond.log"),
            socket,
            pidfile: c
                .dir
                .join("nodes")
                .join(&c.nodes[number - 1])
                .join("ergond.pid"),
            metrics: format!("127.0.0.1:{port}"),
            spool,
        };
        e.spawn()?;
        Ok(e)
    }

    /// Start (or restart) the process and wait until it serves its socket and `/metrics`.
    fn spawn(&mut self) -> Result<()> {
        let bin = target_dir().join("debug/ergond");
        ensure!(
            bin.exists(),
            "{} is missing: build it first (cargo build -p ergond)",
            bin.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting ergond")?;
        std::fs::write(&self.pidfile, format!("{}\n", child.id()))?;
        self.child = Some(child);
        wait_for(Duration::from_secs(20), "ergond to serve", || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("ergond of {} exited ({status})", self.node);
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
        })
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }

    fn request(&self, req: &Request) -> Result<Reply> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write_frame(&mut s, req)?;
        Ok(read_frame(&mut s)?)
    }

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

    /// The file name of `job`'s manifest in this node's spool, if there is one.
    fn manifest_path(&self, job: u32) -> Result<Option<PathBuf>> {
        let suffix = format!("-{job}-{}.json", self.node);
        Ok(std::fs::read_dir(&self.spool)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.') && n.ends_with(&suffix))
            }))
    }

    /// `job`'s manifest of this node, once it is in the spool; verified.
    fn wait_manifest(&self, job: u32) -> Result<Manifest> {
        let path = wait_for(
            MANIFEST_TIMEOUT,
            &format!("job {job}'s manifest on {}", self.node),
            || self.manifest_path(job),
        )?;
        Manifest::from_json(&std::fs::read(&path)?)
            .with_context(|| format!("{} does not verify", path.display()))
    }
}

impl Drop for NodeErgond {
    fn drop(&mut self) {
        self.rapl.store(true, Ordering::Relaxed);
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A multi-node test's world: the cluster, one ergond per node (stopped before the scratch
/// directory goes).
struct Setup {
    c: &'static Cluster,
    ergonds: Vec<NodeErgond>,
    dir: TempDir,
    _guard: std::sync::MutexGuard<'static, ()>,
}

/// The setup, or `None` (having said `SKIPPED`) on a cluster of fewer than `nodes` nodes.
fn setup(name: &str, nodes: usize) -> Option<Setup> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    if c.nodes.len() < nodes {
        ergon_testkit::skipped(
            name,
            &format!(
                "needs a cluster of {nodes} nodes, this one has {} (scripts/slurm-cluster up --nodes 3)",
                c.nodes.len()
            ),
        );
        return None;
    }
    c.install_plugin(ergon_tests::PLUGIN_ARGS).unwrap();
    let dir = scratch_dir(name).unwrap();
    let ergonds = (1..=c.nodes.len())
        .map(|n| {
            NodeErgond::start(c, n, dir.path()).unwrap_or_else(|e| {
                let log =
                    std::fs::read_to_string(dir.path().join(&c.nodes[n - 1]).join("ergond.log"))
                        .unwrap_or_default();
                panic!("ergond of node {n} did not start: {e:#}\n--- its log ---\n{log}")
            })
        })
        .collect();
    Some(Setup {
        c,
        ergonds,
        dir,
        _guard: guard,
    })
}

impl Setup {
    /// Run `body`; on failure, panic with its error and every ergond's log.
    fn run(&mut self, body: impl FnOnce(&mut Setup) -> Result<()>) {
        if let Err(e) = body(self) {
            let logs: String = self
                .ergonds
                .iter()
                .map(|e| format!("--- ergond of {} ---\n{}", e.node, e.log_text()))
                .collect();
            panic!("{e:#}\n{logs}");
        }
    }

    fn ergond(&self, node: &str) -> &NodeErgond {
        self.ergonds
            .iter()
            .find(|e| e.node == node)
            .expect("a node of the cluster")
    }

    /// Submit a job of `nodes` nodes, two GPUs on each, `--energy-report`, that runs two srun
    /// steps across all its nodes (the first about 3 s long), and wait until it completed.
    fn run_job(&self, nodes: usize, extra: &[&str]) -> Result<u32> {
        let d = self.dir.path().display();
        let mut args: Vec<String> = vec![
            format!("-N{nodes}"),
            "--gres=gpu:2".into(),
            "--energy-report".into(),
            "--time=5".into(),
            "--job-name=ergon-multinode".into(),
            format!("--chdir={d}"),
            format!("--output={d}/slurm-%j.out"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([
            "--wrap".into(),
            format!("srun -N{nodes} --ntasks-per-node=1 sleep 3; srun -N{nodes} --ntasks-per-node=1 true"),
        ]);
        let job = self.c.sbatch(&args)?;
        self.c.wait_completed(job)?;
        Ok(job)
    }

    /// A job on the cluster's first two nodes (`--nodelist`), two GPUs on each, whose one srun
    /// step holds on both nodes until `release` exists; returns once it runs on both.
    fn held_job(&self, extra: &[&str]) -> Result<(u32, PathBuf)> {
        let d = self.dir.path();
        let release = d.join("release");
        let nodes = format!("{},{}", self.c.nodes[0], self.c.nodes[1]);
        let mut args: Vec<String> = vec![
            "-N2".into(),
            format!("--nodelist={nodes}"),
            "--gres=gpu:2".into(),
            "--energy-report".into(),
            "--time=5".into(),
            "--job-name=ergon-multinode-held".into(),
            format!("--chdir={}", d.display()),
            format!("--output={}/slurm-%j.out", d.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([
            "--wrap".into(),
            format!(
                "srun -N2 --ntasks-per-node=1 bash -c 'touch {d}/started.$SLURMD_NODENAME; \
                 while [ ! -e {r} ]; do sleep 0.05; done'",
                d = d.display(),
                r = release.display()
            ),
        ]);
        let job = self.c.sbatch(&args)?;
        for n in &self.c.nodes[..2] {
            wait_for(JOB_TIMEOUT, &format!("job {job}'s step on {n}"), || {
                Ok(d.join(format!("started.{n}")).exists().then_some(()))
            })?;
        }
        Ok((job, release))
    }

    /// The job's nodes as Slurm lists them (`sacct NodeList`, expanded by `scontrol show
    /// hostnames`).
    fn job_nodes(&self, job: u32) -> Result<Vec<String>> {
        let list = self
            .c
            .sacct_field(job, "NodeList")?
            .ok_or_else(|| anyhow!("sacct does not list job {job}"))?;
        let out = self.c.run("scontrol", ["show", "hostnames", list.trim()])?;
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// An accounting configuration over the given nodes' spools.
    fn accounting(&self, name: &str, nodes: &[&str]) -> Result<PathBuf> {
        self.accounting_with(name, nodes, "")
    }

    /// As [`Setup::accounting`], with `extra` appended (a sink's section).
    fn accounting_with(&self, name: &str, nodes: &[&str], extra: &str) -> Result<PathBuf> {
        let spools: Vec<String> = nodes
            .iter()
            .map(|n| format!("{:?}", self.ergond(n).spool.display().to_string()))
            .collect();
        let acct = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &acct,
            format!(
                "spool_dirs = [{}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\n[sacct]\n{extra}",
                spools.join(", "),
                self.dir.path().join("quarantine"),
                self.dir.path().join("acct-state"),
            ),
        )?;
        Ok(acct)
    }
}

/// A real VictoriaMetrics (Debian's `/usr/bin/victoria-metrics`) on a free loopback port, for the
/// accounting's uploads; killed on drop.
struct Vm {
    child: Child,
    port: u16,
}

impl Vm {
    fn start(data: &Path) -> Result<Vm> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("/usr/bin/victoria-metrics")
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", data.display()))
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("victoria-metrics (scripts/slurm-cluster install installs it)")?;
        let mut vm = Vm { child, port };
        let ours = format!("-storageDataPath=\"{}\"", data.display());
        wait_for(Duration::from_secs(30), "victoria-metrics to serve", || {
            if let Some(status) = vm.child.try_wait()? {
                bail!("victoria-metrics exited at start ({status})");
            }
            Ok(vm
                .get("/flags", &[])
                .ok()
                .filter(|f| f.contains(&ours))
                .map(|_| ()))
        })?;
        Ok(vm)
    }

    /// `GET path` with url-encoded query parameters, through curl.
    fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<String> {
        let mut c = Command::new("curl");
        c.args(["-sf", "-G"])
            .arg(format!("http://127.0.0.1:{}{path}", self.port));
        for (k, v) in query {
            c.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = c.output()?;
        ensure!(out.status.success(), "curl {path}: {:?}", out.status);
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Every series of `job` (any `ergon_job_*` metric) with its number of samples.
    fn series_of_job(&self, job: u32) -> Result<Vec<(String, usize)>> {
        self.get("/internal/force_flush", &[])?;
        let text = self.get(
            "/api/v1/export",
            &[(
                "match[]",
                &format!("{{__name__=~\"ergon_job_.+\",job_id=\"{job}\"}}"),
            )],
        )?;
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)?;
                Ok((
                    v["metric"]["__name__"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    v["values"].as_array().map_or(0, Vec::len),
                ))
            })
            .collect()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// `ergon run` succeeds.
fn ergon_run(c: &Cluster, acct: &Path) -> Result<String> {
    let out = ergon(c, acct, &["run"])?;
    ensure!(out.status.code() == Some(0), "ergon run: {}", show(&out));
    Ok(show(&out))
}

/// The job's AdminComment and the `ergon1` record in it.
fn sacct_record(c: &Cluster, job: u32) -> Result<(String, ergon_protocol::record::JobRecord)> {
    let field = c.sacct_field(job, "AdminComment")?.unwrap_or_default();
    let rec = ergon_protocol::find_in_field(&field)
        .ok_or_else(|| anyhow!("no ergon1 record in AdminComment {field:?}"))?
        .map_err(|e| anyhow!("AdminComment {field:?}: {e}"))?;
    Ok((field, rec))
}

/// Checks one node's manifest of a job against the fake hardware: exactly the two GPUs Slurm
/// allocated there, each at its power × the node's interval; the srun steps 0 and 1; the batch
/// step only where `batch`. Returns the manifest's GPU energy.
fn check_node_manifest(
    e: &NodeErgond,
    c: &Cluster,
    job: u32,
    m: &Manifest,
    batch: bool,
) -> Result<f64> {
    ensure!(
        m.node == e.node && m.job.job_id == job,
        "{} {:?}",
        m.node,
        m.job
    );
    let secs = (m.end_unix_ns - m.start_unix_ns) as f64 / 1e9;
    ensure!(secs > 2.5, "{}: job interval {secs} s", e.node);
    for step in [StepId::Numbered(0), StepId::Numbered(1), StepId::Extern] {
        ensure!(
            m.steps.iter().any(|s| s.step == step),
            "{}: no step {step}: {:?}",
            e.node,
            m.steps
        );
    }
    ensure!(
        m.steps.iter().any(|s| s.step == StepId::Batch) == batch,
        "{}: batch step expected {batch}: {:?}",
        e.node,
        m.steps
    );
    ensure!(m.gpus.len() == 2, "{}: charged GPUs {:#?}", e.node, m.gpus);
    let mut truth_sum = 0.0;
    for g in &m.gpus {
        let fake = e
            .gpus
            .iter()
            .find(|f| f.uuid == g.uuid)
            .ok_or_else(|| anyhow!("{}: GPU {} is not this node's", e.node, g.uuid))?;
        ensure!(
            g.minor == Some(fake.minor) && g.minor == Some(minor_of(c, g.index)),
            "{g:?}"
        );
        let truth = fake.watts * secs;
        let energy = g.energy_j.ok_or_else(|| anyhow!("not measured: {g:?}"))?;
        let err = (energy - truth).abs() / truth;
        println!(
            "{} gpu{} ({} W): {energy:.1} J over {secs:.3} s, truth {truth:.1} J, error {:.3}%",
            e.node,
            g.index,
            fake.watts,
            100.0 * err
        );
        ensure!(err < ENERGY_TOLERANCE, "{}: {g:?} vs {truth} J", e.node);
        truth_sum += truth;
    }
    let gpu_j = m.totals.gpu_j.ok_or_else(|| anyhow!("no GPU total"))?;
    ensure!(
        (gpu_j - truth_sum).abs() / truth_sum < ENERGY_TOLERANCE,
        "{:?}",
        m.totals
    );
    ensure!(
        m.coverage.fraction == 1.0 && m.coverage.gaps.is_empty(),
        "{:?}",
        m.coverage
    );
    Ok(gpu_j)
}

#[test]
fn a_two_node_job_is_one_record_with_a_per_node_split() {
    let Some(mut s) = setup("multinode-2", 3) else {
        return;
    };
    s.run(|s| {
        let c = s.c;
        let job = s.run_job(2, &[])?;
        let nodes = s.job_nodes(job)?;
        ensure!(nodes.len() == 2, "job {job} ran on {nodes:?}");
        let batch_host = c
            .scontrol_job(job)?
            .into_iter()
            .find(|(k, _)| k == "BatchHost")
            .map(|(_, v)| v)
            .ok_or_else(|| anyhow!("scontrol shows no BatchHost"))?;
        ensure!(
            nodes.contains(&batch_host),
            "BatchHost {batch_host} not in {nodes:?}"
        );

        // Every node of the job: its ergond's manifest, figures from its own fake hardware.
        let mut manifests = Vec::new();
        for n in &nodes {
            let e = s.ergond(n);
            let m = e.wait_manifest(job)?;
            let gpu_j = check_node_manifest(e, c, job, &m, *n == batch_host)?;
            // The job's nodes, as Slurm's own host list, and expanded the same as Slurm does.
            ensure!(
                m.job.node_list == s.c.sacct_field(job, "NodeList")?
                    && m.job.nodes().as_deref() == Some(nodes.as_slice()),
                "{n}: the manifest's job nodes {:?}, Slurm's {nodes:?}",
                m.job.node_list
            );
            manifests.push((n.clone(), m, gpu_j));
        }
        // The node outside the job has nothing of it.
        for e in s.ergonds.iter().filter(|e| !nodes.contains(&e.node)) {
            ensure!(
                e.manifest_path(job)?.is_none(),
                "{} wrote a manifest of job {job}",
                e.node
            );
        }

        // The user's report: on each node, the part of that node, saying so; never a figure
        // that looks like the whole job's.
        let out = std::fs::read_to_string(s.dir.path().join(format!("slurm-{job}.out")))?;
        ensure!(
            out.contains(&format!("job {job} on {batch_host}")),
            "batch node's report in slurm-{job}.out:\n{out}"
        );
        for n in &nodes {
            let text = if *n == batch_host {
                out.clone()
            } else {
                std::fs::read_to_string(s.dir.path().join(format!("ergon-{job}.{n}.txt")))
                    .with_context(|| format!("{n}'s report"))?
            };
            ensure!(
                text.contains(&format!(
                    "this job ran on 2 nodes ({}); this report covers {n} only",
                    nodes.join(", ")
                )) && text.contains(&format!("ergon report {job}")),
                "{n}'s report does not say what it covers:\n{text}"
            );
        }

        // One record for the job, from all the nodes' spools (the third node's included),
        // uploaded to a real VictoriaMetrics too.
        let vm = Vm::start(&s.dir.path().join("vm"))?;
        let all: Vec<&str> = c.nodes.iter().map(String::as_str).collect();
        let acct = s.accounting_with(
            "all",
            &all,
            &format!(
                "\n[victoria_metrics]\nurl = \"http://127.0.0.1:{}\"\n",
                vm.port
            ),
        )?;
        let t = Instant::now();
        ergon_run(c, &acct)?;
        println!("ergon run over {} spools: {:?}", all.len(), t.elapsed());
        let (field, rec) = sacct_record(c, job)?;
        println!("AdminComment: {field}");
        let gpu_sum: f64 = manifests.iter().map(|(_, _, g)| g).sum();
        let energy_sum: f64 = manifests.iter().map(|(_, m, _)| m.totals.energy_j).sum();
        ensure!((rec.nodes, rec.gpus) == (2, 4), "{rec:?}");
        ensure!(
            rec.gpu_j == gpu_sum.round() as u64 && rec.energy_j == energy_sum.round() as u64,
            "{rec:?} vs the nodes' sums: gpu {gpu_sum} J, energy {energy_sum} J"
        );
        ensure!(
            field.matches("ergon1 ").count() == 1,
            "AdminComment {field:?}"
        );
        // Collected again: nothing changes.
        ergon_run(c, &acct)?;
        let (again, _) = sacct_record(c, job)?;
        ensure!(
            again == field,
            "second run changed AdminComment: {field:?} → {again:?}"
        );
        // Uploaded once: every series of the job has one sample, after both runs.
        let series = vm.series_of_job(job)?;
        println!("VictoriaMetrics series of job {job}: {series:?}");
        ensure!(
            !series.is_empty() && series.iter().all(|(_, n)| *n == 1),
            "job {job} in VictoriaMetrics: {series:?}"
        );

        // `ergon report`: the per-node split, each node's figures its manifest's.
        let out = ergon(c, &acct, &["report", &job.to_string(), "--json"])?;
        ensure!(out.status.code() == Some(0), "ergon report: {}", show(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let per_node = report["manifests"]["nodes"]
            .as_array()
            .ok_or_else(|| anyhow!("no per-node split: {report}"))?;
        ensure!(per_node.len() == 2, "{per_node:?}");
        for (n, m, _) in &manifests {
            let entry = per_node
                .iter()
                .find(|e| e["node"].as_str() == Some(n))
                .ok_or_else(|| anyhow!("{n} not in the report's nodes {per_node:?}"))?;
            ensure!(
                entry["energy_j"].as_f64() == Some(m.totals.energy_j),
                "{entry} vs {:?}",
                m.totals
            );
        }
        let text = ergon(c, &acct, &["report", &job.to_string()])?;
        let text = String::from_utf8_lossy(&text.stdout);
        println!("{text}");
        for n in &nodes {
            ensure!(
                text.contains(&format!("    {n} ")),
                "{n} not in the report:\n{text}"
            );
        }
        Ok(())
    });
}

#[test]
fn a_three_node_job_collected_late_is_updated_once() {
    let Some(mut s) = setup("multinode-3", 3) else {
        return;
    };
    s.run(|s| {
        let c = s.c;
        let job = s.run_job(3, &[])?;
        let nodes = s.job_nodes(job)?;
        ensure!(nodes.len() == 3, "job {job} ran on {nodes:?}");
        let mut gpu_sum = 0.0;
        for n in &nodes {
            let e = s.ergond(n);
            let m = e.wait_manifest(job)?;
            let batch = m.steps.iter().any(|st| st.step == StepId::Batch);
            gpu_sum += check_node_manifest(e, c, job, &m, batch)?;
        }

        // The third node's spool is late: the first run sees two nodes, and says so.
        let early: Vec<&str> = nodes[..2].iter().map(String::as_str).collect();
        ergon_run(c, &s.accounting("early", &early)?)?;
        let (first, rec) = sacct_record(c, job)?;
        println!("AdminComment after the early run: {first}");
        ensure!(rec.nodes == 2 && rec.gpus == 4, "{rec:?}");
        ensure!(
            rec.nodes_expected == Some(3),
            "the record does not say 2 of 3 nodes reported: {rec:?}"
        );
        // The late spool arrives: the record is replaced, once, by the whole job's.
        let all: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let acct = s.accounting("all", &all)?;
        ergon_run(c, &acct)?;
        let (second, rec) = sacct_record(c, job)?;
        println!("AdminComment after the late spool: {second}");
        ensure!(second.matches("ergon1 ").count() == 1, "{second:?}");
        ensure!((rec.nodes, rec.gpus) == (3, 6), "{rec:?}");
        ensure!(rec.nodes_expected.is_none(), "complete, yet {rec:?}");
        ensure!(
            rec.gpu_j == gpu_sum.round() as u64,
            "{rec:?} vs {gpu_sum} J"
        );
        // Every spool collected again: nothing changes.
        ergon_run(c, &acct)?;
        let (third, _) = sacct_record(c, job)?;
        ensure!(third == second, "{second:?} → {third:?}");
        Ok(())
    });
}

#[test]
fn ergond_down_on_one_node_the_record_names_it() {
    let Some(mut s) = setup("multinode-down", 2) else {
        return;
    };
    s.run(|s| {
        let c = s.c;
        // The last node's ergond is down for the whole job; its plugin queues the events, and
        // nothing replays them during this test (that is the one-node recovery, tested in
        // chain.rs).
        let down = c.nodes[c.nodes.len() - 1].clone();
        let idx = s.ergonds.iter().position(|e| e.node == down).unwrap();
        s.ergonds[idx].kill();
        let first = c.nodes[0].clone();
        let job = s.run_job(2, &[&format!("--nodelist={first},{down}")])?;
        let nodes = s.job_nodes(job)?;
        ensure!(nodes == vec![first.clone(), down.clone()], "{nodes:?}");
        let e = s.ergond(&first);
        let m = e.wait_manifest(job)?;
        let batch = m.steps.iter().any(|st| st.step == StepId::Batch);
        let gpu_j = check_node_manifest(e, c, job, &m, batch)?;

        let all: Vec<&str> = c.nodes.iter().map(String::as_str).collect();
        let acct = s.accounting("all", &all)?;
        let run = ergon_run(c, &acct)?;
        let (field, rec) = sacct_record(c, job)?;
        println!("AdminComment: {field}\n{run}");
        // What was measured, and only that: one node, its two GPUs; 1 of 2 nodes reported.
        ensure!((rec.nodes, rec.gpus) == (1, 2), "{rec:?}");
        ensure!(rec.gpu_j == gpu_j.round() as u64, "{rec:?} vs {gpu_j}");
        ensure!(rec.nodes_expected == Some(2), "{rec:?}");
        let out = ergon(c, &acct, &["report", &job.to_string()])?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{text}");
        ensure!(
            text.contains(&format!("missing {down}")) && text.contains("incomplete"),
            "the report does not name the missing node {down}:\n{text}"
        );
        Ok(())
    });
}

#[test]
fn ergond_restarted_mid_job_on_one_node_recovers_its_gap() {
    let Some(mut s) = setup("multinode-restart", 2) else {
        return;
    };
    s.run(|s| {
        let c = s.c;
        let (job, release) = s.held_job(&[])?;
        let (first, second) = (c.nodes[0].clone(), c.nodes[1].clone());
        let idx = s.ergonds.iter().position(|e| e.node == second).unwrap();
        ensure!(
            matches!(
                s.ergonds[idx].request(&Request::QueryJob { job_id: job })?,
                Reply::Job(_)
            ),
            "{second}'s ergond does not know the running job"
        );
        // Once its journal holds the job (written within 250 ms of a change), kill -9 and
        // restart the second node's ergond while the job runs there.
        let journal = s.dir.path().join(&second).join("state/jobs.journal");
        let known = std::time::SystemTime::now();
        wait_for(Duration::from_secs(5), "the journal to be written", || {
            Ok(std::fs::metadata(&journal)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > known)
                .then_some(()))
        })?;
        s.ergonds[idx].kill();
        s.ergonds[idx].spawn()?;
        let restarted = Instant::now();
        // Not a synchronisation: the job runs on for 2 s after the restart, so that the readings
        // at its end (20 ms counter steps) weigh little against the whole.
        if let Some(rest) = Duration::from_secs(2).checked_sub(restarted.elapsed()) {
            std::thread::sleep(rest);
        }
        std::fs::write(&release, b"")?;
        c.wait_completed(job)?;

        // The first node: untouched, exact.
        let e1 = s.ergond(&first);
        let m1 = e1.wait_manifest(job)?;
        ensure!(
            m1.coverage.gaps.is_empty() && m1.coverage.fraction == 1.0,
            "{:?}",
            m1.coverage
        );
        // The second: one gap, recovered from the GPUs' counters, as on one node.
        let e2 = s.ergond(&second);
        let m2 = e2.wait_manifest(job)?;
        ensure!(
            m2.coverage.gaps.len() == 1
                && m2.coverage.gaps[0].recovered
                && m2.coverage.fraction == 1.0,
            "{second}'s outage is not a recovered gap: {:?}",
            m2.coverage
        );
        let secs = (m2.end_unix_ns - m2.start_unix_ns) as f64 / 1e9;
        ensure!(m2.gpus.len() == 2, "{:?}", m2.gpus);
        for g in &m2.gpus {
            let fake = e2
                .gpus
                .iter()
                .find(|f| f.uuid == g.uuid)
                .ok_or_else(|| anyhow!("{g:?}"))?;
            let truth = fake.watts * secs;
            let energy = g.energy_j.ok_or_else(|| anyhow!("not measured: {g:?}"))?;
            println!(
                "{second} gpu{} across the restart: {energy:.1} J, truth {truth:.1} J",
                g.index
            );
            ensure!((energy - truth).abs() / truth < 0.02, "{g:?} vs {truth} J");
        }
        // One complete record of both nodes.
        let acct = s.accounting("all", &[first.as_str(), second.as_str()])?;
        ergon_run(c, &acct)?;
        let (field, rec) = sacct_record(c, job)?;
        println!("AdminComment: {field}");
        ensure!(
            (rec.nodes, rec.gpus, rec.nodes_expected) == (2, 4, None),
            "{rec:?}"
        );
        let sum = m1.totals.gpu_j.unwrap_or(0.0) + m2.totals.gpu_j.unwrap_or(0.0);
        ensure!(rec.gpu_j == sum.round() as u64, "{rec:?} vs {sum} J");
        Ok(())
    });
}

/// Puts a node killed by a test back: `slurm-cluster up` starts its slurmd again and resumes it.
struct NodeBack;

impl Drop for NodeBack {
    fn drop(&mut self) {
        let script = ergon_tests::repo_root().join("scripts/slurm-cluster");
        match Command::new(&script).arg("up").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "slurm-cluster up after the node test: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("slurm-cluster up after the node test: {e}"),
        }
    }
}

#[test]
fn a_node_that_dies_mid_job_leaves_an_incomplete_record() {
    let Some(mut s) = setup("multinode-nodefail", 2) else {
        return;
    };
    s.run(|s| {
        let c = s.c;
        let (job, _release) = s.held_job(&["--no-requeue"])?;
        let (first, second) = (c.nodes[0].clone(), c.nodes[1].clone());
        // The second node dies: everything in its network namespace (slurmd, the job's
        // slurmstepd and tasks) is killed at once, as a crash would; Slurm is told it is down
        // rather than waiting SlurmdTimeout for it.
        let _back = NodeBack;
        let pid = std::fs::read_to_string(c.dir.join("nodes").join(&second).join("slurmd.pid"))?;
        let ns = Command::new("ip")
            .args(["netns", "identify", pid.trim()])
            .output()?;
        let ns = String::from_utf8(ns.stdout)?.trim().to_string();
        ensure!(
            ns.starts_with("ergon-"),
            "{second}'s slurmd is in network namespace {ns:?}"
        );
        let pids = Command::new("ip").args(["netns", "pids", &ns]).output()?;
        let pids = String::from_utf8(pids.stdout)?;
        ensure!(!pids.trim().is_empty(), "no process in {ns}");
        for p in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", p]).status();
        }
        c.run(
            "scontrol",
            [
                "update",
                &format!("nodename={second}"),
                "state=down",
                "reason=ergon-test-node-died",
            ],
        )?;
        let state = c.wait_job_state(job, &["NODE_FAIL"], JOB_TIMEOUT)?;
        println!("job {job}: {state}");

        // The first node's manifest is written as for any job end; the second has none.
        let e1 = s.ergond(&first);
        let m1 = e1.wait_manifest(job)?;
        ensure!(
            m1.job.nodes().as_deref() == Some(&[first.clone(), second.clone()][..]),
            "{:?}",
            m1.job
        );
        ensure!(
            s.ergond(&second).manifest_path(job)?.is_none(),
            "a manifest from the dead node"
        );
        let acct = s.accounting("all", &[first.as_str(), second.as_str()])?;
        let run = ergon_run(c, &acct)?;
        let (field, rec) = sacct_record(c, job)?;
        println!("AdminComment: {field}\n{run}");
        ensure!(
            (rec.nodes, rec.gpus, rec.nodes_expected) == (1, 2, Some(2)),
            "{rec:?}"
        );
        ensure!(
            rec.gpu_j == m1.totals.gpu_j.unwrap_or(0.0).round() as u64,
            "{rec:?}"
        );
        let out = ergon(c, &acct, &["report", &job.to_string()])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(text.contains(&format!("missing {second}")), "{text}");
        Ok(())
    });
}
