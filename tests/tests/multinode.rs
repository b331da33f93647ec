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
//!   real VictoriaMetrics (its usage counters count the job once, with the nodes' summed energy),
//!   a second run changes nothing; `ergon report` shows the per-node split; the user's report on each node says that
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
//! - `a_heterogeneous_job_on_a_gpu_node_and_a_cpu_only_node_adds_up`: a heterogeneous job, one
//!   component on the first node (4 GPUs, 2 sockets) and one on a node Slurm gives no GPUs (whose
//!   ergond has no NVIDIA library): each component's manifest and record is its node's, the GPU
//!   node's GPUs each at their power, the CPU-only node's with no GPU part at all (not unknown, not
//!   0 J of a GPU), and its user report says no GPU was allocated.
//!
//! Nodes: the first has two sockets (generated topology and RAPL packages), the others one; a node
//! without GPUs in Slurm's configuration has no fake NVIDIA library.
//!
//! These need a cluster of at least two nodes; on the one-node cluster the other end-to-end tests
//! use, each says `SKIPPED` and returns. `scripts/test` brings a 4-node 22.05 cluster up for them
//! (`--nodes 4 --cpu-only-nodes 1`).

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

/// The GPUs Slurm's configuration gives `node` (`sinfo`'s GRES, e.g. `gpu:4`; `(null)`: none).
fn slurm_gpus(c: &Cluster, node: &str) -> Result<u32> {
    let out = c.run("sinfo", ["-h", "-N", "-n", node, "-o", "%G"])?;
    let gres = String::from_utf8(out.stdout)?;
    let gres = gres.trim();
    Ok(gres
        .split(',')
        .find_map(|g| g.strip_prefix("gpu:"))
        .and_then(|n| n.split('(').next()?.rsplit(':').next()?.parse().ok())
        .unwrap_or(0))
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
    /// Its fake GPUs; none on a node that Slurm gives no GPUs (a CPU-only node: no NVIDIA
    /// library at all, as on a node without the driver).
    gpus: Vec<FakeGpu>,
    /// Its sockets (generated CPU topology and RAPL packages): 2 on the first node, else 1.
    sockets: u32,
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
    /// Configure node `number`'s (1-based) ergond under `dir` and start it: four fake GPUs on a
    /// node Slurm gives GPUs, none on a CPU-only node; two sockets on the first node, one on the
    /// others.
    fn start(c: &Cluster, number: usize, dir: &Path) -> Result<NodeErgond> {
        let node = c.nodes[number - 1].clone();
        let has_gpus = slurm_gpus(c, &node)? > 0;
        let sockets = if number == 1 { 2 } else { 1 };
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
        let gpus: Vec<FakeGpu> = (0..if has_gpus { 4u32 } else { 0 })
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
        // A CPU-only node has no NVIDIA library: ergond samples without GPUs.
        let lib = if has_gpus {
            lib
        } else {
            dir.join("no-driver/libnvidia-ml.so.1")
        };
        // The node's CPUs spread over its sockets (CPU i on socket i mod sockets), and one RAPL
        // package (with its DRAM zone) per socket.
        let sysfs = dir.join("sys");
        let ncpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let topology: Vec<(u32, u32, u32)> = (0..ncpus).map(|i| (i, i % sockets, 0)).collect();
        ergon_testkit::write_cpu_topology(&sysfs, &topology);
        let powercap = dir.join("powercap");
        PowercapTree::create(&powercap, &PowercapLayout::IntelServer { sockets }.zones());
        let rapl = Arc::new(AtomicBool::new(false));
        {
            let stop = Arc::clone(&rapl);
            let counters: Vec<(PathBuf, PathBuf)> = (0..sockets)
                .map(|k| {
                    (
                        powercap.join(format!("intel-rapl:{k}/energy_uj")),
                        powercap.join(format!("intel-rapl:{k}:0/energy_uj")),
                    )
                })
                .collect();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let t = t0.elapsed().as_secs_f64();
                    for (pkg, dram) in &counters {
                        ergon_testkit::write_counter_file(pkg, (PACKAGE_W * t * 1e6) as u64);
                        ergon_testkit::write_counter_file(dram, (DRAM_W * t * 1e6) as u64);
                    }
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
                 cgroup_root = \"/sys/fs/cgroup\"\nproc_root = \"/proc\"\nsysfs_root = {}\n\
                 socket_path = {}\n\
                 state_dir = {}\nspool_dir = {}\nmetrics_listen = \"127.0.0.1:{port}\"\n\
                 node_name = {node:?}\ngres_conf = {}\nprivate_data = \"no\"\n",
                q(&lib),
                q(&powercap),
                q(&dir.join("no-perf")),
                q(&sysfs),
                q(&socket),
                q(&dir.join("state")),
                q(&spool),
                q(&c.dir.join("etc/gres.conf")),
            ),
        )?;
        let mut e = NodeErgond {
            node,
            gpus,
            sockets,
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
            Ok((gpus == self.gpus.len()).then_some(()))
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
                "needs a cluster of {nodes} nodes, this one has {} (scripts/slurm-cluster up --nodes 4 --cpu-only-nodes 1)",
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

    /// The newest value of each `ergon_usage_<counter>` series (the default upload: counters per
    /// cluster/partition/account/user), summed over the series. Raw samples from
    /// `/api/v1/export` with an explicit end (a query would leave out the newest 30 s).
    fn usage_sum(&self, counter: &str) -> Result<f64> {
        self.get("/internal/force_flush", &[])?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let text = self.get(
            "/api/v1/export",
            &[
                ("match[]", &format!("ergon_usage_{counter}")),
                ("start", &(now - 3600).to_string()),
                ("end", &(now + 60).to_string()),
            ],
        )?;
        let mut sum = 0.0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let newest = v["timestamps"]
                .as_array()
                .and_then(|t| (0..t.len()).max_by_key(|&i| t[i].as_i64()))
                .ok_or_else(|| anyhow!("no samples in {line}"))?;
            sum += v["values"][newest]
                .as_f64()
                .ok_or_else(|| anyhow!("no value in {line}"))?;
        }
        Ok(sum)
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
        // Uploaded once: after both runs the usage counters (the default upload) count the job
        // once, with the record's energy — not once per node, not once per run.
        let jobs = vm.usage_sum("jobs_total")?;
        let energy = vm.usage_sum("energy_joules_total")?;
        let gpu = vm.usage_sum("gpu_energy_joules_total")?;
        println!("VictoriaMetrics usage counters: jobs {jobs}, energy {energy} J, gpu {gpu} J");
        ensure!(jobs == 1.0, "jobs counted in VictoriaMetrics: {jobs}");
        ensure!(
            (energy - energy_sum).abs() <= 1.0 && (gpu - gpu_sum).abs() <= 1.0,
            "VictoriaMetrics counters energy {energy} J, gpu {gpu} J vs the nodes' sums \
             {energy_sum} J, {gpu_sum} J"
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
        // The last GPU node's ergond is down for the whole job; its plugin queues the events, and
        // nothing replays them during this test (that is the one-node recovery, tested in
        // chain.rs).
        let mut gpu_nodes = Vec::new();
        for n in &c.nodes {
            if slurm_gpus(c, n)? > 0 {
                gpu_nodes.push(n.clone());
            }
        }
        let down = gpu_nodes.last().cloned().expect("a node with GPUs");
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

/// The cluster's first node without GPUs in Slurm's configuration (`up --cpu-only-nodes 1`).
fn cpu_only_node(c: &Cluster) -> Result<Option<String>> {
    for n in &c.nodes {
        if slurm_gpus(c, n)? == 0 {
            return Ok(Some(n.clone()));
        }
    }
    Ok(None)
}

#[test]
fn a_heterogeneous_job_on_a_gpu_node_and_a_cpu_only_node_adds_up() {
    const NAME: &str = "a_heterogeneous_job_on_a_gpu_node_and_a_cpu_only_node_adds_up";
    let Some(mut s) = setup(NAME, 2) else {
        return;
    };
    let Some(cpu_node) = cpu_only_node(s.c).unwrap() else {
        ergon_testkit::skipped(
            NAME,
            "needs a node without GPUs (scripts/slurm-cluster up --nodes 4 --cpu-only-nodes 1)",
        );
        return;
    };
    s.run(|s| {
        let c = s.c;
        let gpu_node = c.nodes[0].clone();
        let d = s.dir.path().display().to_string();
        // Slurm places no single job with GPUs on one node and none on another (`--gpus=4 -N2`
        // over these two nodes: "Requested node configuration is not available"): a
        // heterogeneous job does it, one component per node.
        let job = c.sbatch([
            "-N1",
            &format!("--nodelist={gpu_node}"),
            "--gres=gpu:4",
            "--energy-report",
            "--time=5",
            "--job-name=ergon-het",
            &format!("--chdir={d}"),
            &format!("--output={d}/slurm-%j.out"),
            ":",
            "-N1",
            &format!("--nodelist={cpu_node}"),
            "--wrap",
            "srun --het-group=0,1 sleep 3",
        ])?;
        c.wait_completed(job)?;
        // Each component is a job of its own for Slurm's accounting (sacct `J+0`, `J+1`, with
        // their own raw ids), so each gets its own manifest and record.
        let rows = c.sacct_rows(job, "JobID,JobIDRaw,NodeList")?;
        println!("{rows:?}");
        let het: u32 = rows
            .iter()
            .find(|r| r[0] == format!("{job}+1"))
            .ok_or_else(|| anyhow!("no component {job}+1 in {rows:?}"))?[1]
            .parse()?;

        // The GPU node: its four GPUs, each at its known power, and its two sockets' RAPL zones.
        let e1 = s.ergond(&gpu_node);
        let m1 = e1.wait_manifest(job)?;
        let secs = (m1.end_unix_ns - m1.start_unix_ns) as f64 / 1e9;
        ensure!(m1.gpus.len() == 4, "{gpu_node}: {:#?}", m1.gpus);
        for g in &m1.gpus {
            let fake = e1
                .gpus
                .iter()
                .find(|f| f.uuid == g.uuid)
                .ok_or_else(|| anyhow!("GPU {} is not {gpu_node}'s", g.uuid))?;
            let truth = fake.watts * secs;
            let energy = g.energy_j.ok_or_else(|| anyhow!("not measured: {g:?}"))?;
            ensure!(
                (energy - truth).abs() / truth < ENERGY_TOLERANCE,
                "{gpu_node}: {g:?} vs {truth} J"
            );
        }
        let rapl = m1
            .sensors
            .iter()
            .find(|x| x.kind == ergon_protocol::SensorKind::RaplPowercap)
            .ok_or_else(|| anyhow!("no RAPL sensor: {:?}", m1.sensors))?;
        ensure!(
            e1.sockets == 2
                && rapl.detail.contains("package-0")
                && rapl.detail.contains("package-1"),
            "{gpu_node}'s two sockets: {rapl:?}"
        );
        ensure!(m1.totals.cpu_j.is_some_and(|j| j > 0.0), "{:?}", m1.totals);

        // The CPU-only node: no GPU part at all — not "unknown", not a GPU energy of 0.
        let e2 = s.ergond(&cpu_node);
        let m2 = e2.wait_manifest(het)?;
        ensure!(
            m2.gpus.is_empty()
                && m2.totals.gpu_j.is_none()
                && m2.coverage.gpus_unknown.is_none()
                && m2.coverage.fraction == 1.0,
            "{cpu_node}: gpus {:?}, totals {:?}, coverage {:?}",
            m2.gpus,
            m2.totals,
            m2.coverage
        );
        ensure!(m2.totals.cpu_j.is_some_and(|j| j > 0.0), "{:?}", m2.totals);
        ensure!(
            e1.manifest_path(het)?.is_none() && e2.manifest_path(job)?.is_none(),
            "a component's manifest on the other component's node"
        );

        // The records: each component's is its node's manifest, and they add up to the job.
        let acct = s.accounting("het", &[gpu_node.as_str(), cpu_node.as_str()])?;
        ergon_run(c, &acct)?;
        let (_, r1) = sacct_record(c, job)?;
        let (_, r2) = sacct_record(c, het)?;
        println!("{job}: {r1:?}\n{het}: {r2:?}");
        ensure!(
            (r1.nodes, r1.gpus, r1.gpu_j, r1.energy_j)
                == (
                    1,
                    4,
                    m1.totals.gpu_j.unwrap_or_default().round() as u64,
                    m1.totals.energy_j.round() as u64
                ),
            "{r1:?} vs {:?}",
            m1.totals
        );
        ensure!(
            (
                r2.nodes,
                r2.gpus,
                r2.gpu_j,
                r2.gpus_unknown_nodes,
                r2.energy_j
            ) == (1, 0, 0, 0, m2.totals.energy_j.round() as u64)
                && r2.coverage_gpu.is_none(),
            "{r2:?} vs {:?}",
            m2.totals
        );

        // The user's report of the CPU-only component says it has no GPU, not that its GPU
        // energy is unknown or not measured.
        let report = s.dir.path().join(format!("ergon-{het}.txt"));
        let text = wait_for(MANIFEST_TIMEOUT, &format!("{}", report.display()), || {
            Ok(std::fs::read_to_string(&report).ok())
        })?;
        println!("{text}");
        ensure!(
            text.contains("GPU      none (no GPU allocated")
                && !text.contains("unknown")
                && !text.contains("not measured"),
            "{text}"
        );
        Ok(())
    });
}
