//! The user's report for `--energy-report`: a summary of the job's manifest, written at the
//! job's end **as the job's user**.
//!
//! Where it goes (per node):
//! - `text` on the node that ran the batch script: appended to the job's stdout file (the
//!   file behind the batch script's `/proc/<pid>/fd/1` when the plugin's StepStart named the
//!   task, else `SLURM_JOB_STDOUT`), so it is the last thing in `slurm-<jobid>.out`;
//! - otherwise (a `json` report, a node without the batch step, an `srun`/`salloc` job
//!   whose stdout is a terminal, or a stdout file that cannot be appended to): a new file in
//!   the job's working directory, named by [`file_name`]: `ergon-<id>[.<node>].<txt|json>`,
//!   where `<id>` is the job id, or `<array job id>_<task id>` for an array task (as Slurm's
//!   `%A_%a`), and `.<node>` is there for every node of a job that ran on several nodes (and,
//!   where the plugin did not give the job's nodes, for a node that did not run the batch
//!   script). Both formats, every node, every array task: no two reports of a job share a name.
//!
//! A job that ran on several nodes gets one report per node, each of that node's part: each
//! says so on its first lines ("this job ran on N nodes (…); this report covers <node> only")
//! and names `ergon report <id>` for the whole job, which the accounting combines from every
//! node's manifest. ergond never writes a node's figure as if it were the job's
//! ([docs/attribution.md](../../../docs/attribution.md#jobs-on-several-nodes)).
//!
//! How it is written: by a process of its own, `ergond write-report` (ergond's own binary, run
//! again with its environment cleared), which becomes the job's uid and gid (and no other
//! group) before it does anything else, reads the report on its standard input and only then
//! opens the file — `O_NOFOLLOW` (a symlink is refused), `O_NONBLOCK` and a regular-file check
//! (a FIFO or device is refused), and for the new file `O_CREAT | O_EXCL` (nothing existing is
//! replaced). So the kernel checks every access with the user's own rights: ergond never writes
//! into a user's directory as root. ergond waits at most [`WRITE_TIMEOUT`] for it (a hung NFS
//! server) and then kills it.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ergon_protocol::{format, Manifest, ReportFormat, StepId};
use serde::Serialize;

/// Longest wait for the writer process.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a report is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Appended to an existing regular file (the job's stdout).
    Append(PathBuf),
    /// A new file; an existing one (or a symlink) is not replaced.
    Create(PathBuf),
}

impl Target {
    /// The file.
    pub fn path(&self) -> &Path {
        match self {
            Target::Append(p) | Target::Create(p) => p,
        }
    }
}

/// Where the report of `manifest` goes, in order of preference; empty when the job gave
/// neither a stdout file nor a working directory (nothing can be written).
pub fn targets(
    manifest: &Manifest,
    format: ReportFormat,
    stdout_path: Option<&str>,
    work_dir: Option<&str>,
    ran_batch: bool,
) -> Vec<Target> {
    let mut out = Vec::new();
    let absolute = |s: &str| {
        let p = Path::new(s);
        (p.is_absolute() && !s.contains('\0')).then(|| p.to_path_buf())
    };
    if format == ReportFormat::Text && ran_batch {
        if let Some(p) = stdout_path.and_then(absolute) {
            out.push(Target::Append(p));
        }
    }
    if let Some(dir) = work_dir.and_then(absolute) {
        out.push(Target::Create(
            dir.join(file_name(manifest, format, ran_batch)),
        ));
    }
    out
}

/// The job's id as a person and Slurm's `%A_%a` name it: `<array job id>_<task id>` for an
/// array task, else the job id.
pub fn job_label(m: &Manifest) -> String {
    match (m.job.array_job_id, m.job.array_task_id) {
        (Some(a), Some(t)) => format!("{a}_{t}"),
        _ => m.job.job_id.to_string(),
    }
}

/// The nodes of the job when it ran on more than one (the manifest's `job.node_list`).
fn other_nodes(m: &Manifest) -> Option<Vec<String>> {
    m.job.nodes().filter(|n| n.len() > 1)
}

/// The report file's name in the job's working directory (see the module documentation):
/// `ergon-<id>.<ext>` for a job on one node, `ergon-<id>.<node>.<ext>` on every node of a job
/// on several (and on a node that did not run the batch script, when the job's nodes are not
/// known).
pub fn file_name(m: &Manifest, format: ReportFormat, ran_batch: bool) -> String {
    let ext = match format {
        ReportFormat::Text => "txt",
        ReportFormat::Json => "json",
    };
    let per_node = match m.job.nodes() {
        Some(nodes) => nodes.len() > 1,
        None => !ran_batch,
    };
    if per_node {
        format!("ergon-{}.{}.{ext}", job_label(m), m.node)
    } else {
        format!("ergon-{}.{ext}", job_label(m))
    }
}

/// How a list of node names is shown: all of them up to eight, else the first six and a count.
fn show_nodes(nodes: &[String]) -> String {
    if nodes.len() <= 8 {
        nodes.join(", ")
    } else {
        format!("{}, … and {} more", nodes[..6].join(", "), nodes.len() - 6)
    }
}

fn opt_energy(j: Option<f64>) -> String {
    j.map_or_else(|| "not measured".to_owned(), format::energy)
}

fn opt_power(w: Option<f64>) -> String {
    w.map_or_else(|| "n/a".to_owned(), format::power)
}

fn step_name(job_id: u32, s: StepId) -> String {
    format!("{job_id}.{s}")
}

/// Static CO2e and cost factors for the report's estimate (ergond's `[report]`): the
/// accounting computes the figures of record over the job's power trace with the site's
/// factors (`ergon report`); this is what the user sees at once, said to be an estimate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Factors {
    /// Grid carbon intensity, gCO2e per kWh.
    pub co2e_g_per_kwh: Option<f64>,
    /// Facility PUE (1 when unset).
    pub pue: Option<f64>,
    /// Energy price per kWh.
    pub price_per_kwh: Option<f64>,
    /// The price's currency code.
    pub currency: Option<String>,
    /// Where the factors come from, in words.
    pub source: Option<String>,
}

/// The estimate [`Factors`] give for `energy_j`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// gCO2e (absent without an intensity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub co2e_g: Option<f64>,
    /// Cost in `currency` (absent without a price).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// The cost's currency code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// The intensity applied, gCO2e per kWh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub co2e_g_per_kwh: Option<f64>,
    /// The PUE applied.
    pub pue: f64,
    /// The price applied, per kWh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_per_kwh: Option<f64>,
    /// Where the factors come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Factors {
    /// The estimate for `energy_j` (the facility's energy: × PUE), or `None` when neither an
    /// intensity nor a price is set.
    pub fn estimate(&self, energy_j: f64) -> Option<Estimate> {
        if self.co2e_g_per_kwh.is_none() && self.price_per_kwh.is_none() {
            return None;
        }
        let pue = self.pue.unwrap_or(1.0);
        let kwh = energy_j / 3.6e6 * pue;
        Some(Estimate {
            co2e_g: self.co2e_g_per_kwh.map(|i| kwh * i),
            cost: self.price_per_kwh.map(|p| kwh * p),
            currency: self.currency.clone(),
            co2e_g_per_kwh: self.co2e_g_per_kwh,
            pue,
            price_per_kwh: self.price_per_kwh,
            source: self.source.clone(),
        })
    }
}

/// The report's "At the wall" line (and a note on what it does not cover or where the meter
/// disagreed).
fn wall_text(w: &ergon_protocol::manifest::WallEnergy) -> String {
    // A source that names its kind already ("hwmon power_meter (…)", "redfish https://…")
    // is not prefixed with it again.
    let meter = if w.meter.source.starts_with(&w.meter.kind) {
        w.meter.source.clone()
    } else {
        format!("{} {}", w.meter.kind, w.meter.source)
    };
    let mut line = format!(
        "At the wall  {} (components {} + rest of node {}, {meter}, resolution {}, rest split by {})",
        format::energy(w.energy_j),
        format::energy(w.components_j),
        format::energy(w.rest_of_node_j),
        format::duration(w.meter.resolution_s),
        w.rule
    );
    if w.unmetered_s > 0.0 {
        line.push_str(&format!(
            "\n           over {} of the job; {} the meter did not cover is not included",
            format::duration(w.metered_s),
            format::duration(w.unmetered_s)
        ));
    }
    if w.disagreements > 0 {
        line.push_str(&format!(
            "\n           the node's components measured more than the meter in {} interval(s), \
             beyond its {}% accuracy: the rest of the node is 0 there",
            w.disagreements, w.meter.accuracy_percent
        ));
    }
    line
}

/// The report's estimate line, or nothing.
fn estimate_text(m: &Manifest, factors: &Factors) -> Option<String> {
    let e = factors.estimate(m.totals.energy_j)?;
    let mut what = Vec::new();
    let mut how = Vec::new();
    if let (Some(g), Some(i)) = (e.co2e_g, e.co2e_g_per_kwh) {
        what.push(format!("{} CO2e", format::co2e(g)));
        how.push(format!("{i} gCO2e/kWh"));
    }
    if let (Some(c), Some(p)) = (e.cost, e.price_per_kwh) {
        let cur = e.currency.as_deref().unwrap_or("");
        what.push(format!("{c:.4} {cur}").trim_end().to_owned());
        how.push(format!("{p} {cur}/kWh").replace(" /", "/"));
    }
    Some(format!(
        "Footprint  about {}: {} × PUE {} × {}, static factors{}.\n           \
         The accounting's figures, over the power trace with the site's factors: `ergon report {}`.",
        what.join(" and "),
        format::energy(m.totals.energy_j),
        e.pue,
        how.join(", "),
        e.source.map(|s| format!(" ({s})")).unwrap_or_default(),
        job_label(m)
    ))
}

/// The text report.
pub fn render_text(m: &Manifest, manifest_path: Option<&Path>, factors: &Factors) -> String {
    let mut s = String::new();
    let t = &m.totals;
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "==== ergon energy report: job {} on {} ({}) ====",
        m.job.job_id, m.node, m.cluster
    );
    if let Some(nodes) = other_nodes(m) {
        let _ = writeln!(
            s,
            "Scope      this job ran on {} nodes ({}); this report covers {} only.\n           \
             The whole job: `ergon report {}` once the site's accounting has run.",
            nodes.len(),
            show_nodes(&nodes),
            m.node,
            job_label(m)
        );
    }
    let _ = writeln!(
        s,
        "Duration   {}    coverage {}",
        format::duration(m.duration_s),
        format::percent(m.coverage.fraction)
    );
    let _ = writeln!(
        s,
        "Energy     {}    average {}, peak {}",
        format::energy(t.energy_j),
        format::power(t.avg_w),
        format::power(t.peak_w)
    );
    // A job that holds no GPU here (a CPU-only node or job) has no GPU part; "not measured"
    // is for GPUs it holds whose energy could not be read.
    let no_gpus = m.gpus.is_empty() && m.coverage.gpus_unknown.is_none() && t.gpu_j.is_none();
    let _ = writeln!(
        s,
        "  GPU      {}{}",
        if no_gpus {
            "none (no GPU allocated to the job on this node)".to_owned()
        } else {
            opt_energy(t.gpu_j)
        },
        if m.gpus.is_empty() {
            String::new()
        } else {
            format!("    {} GPU(s)", m.gpus.len())
        }
    );
    for g in &m.gpus {
        let _ = writeln!(
            s,
            "    gpu{} {}{}: {}, average {}, peak {}{}",
            g.index,
            g.uuid,
            g.minor
                .map_or_else(String::new, |n| format!(" (minor {n})")),
            opt_energy(g.energy_j),
            opt_power(g.avg_w),
            opt_power(g.peak_w),
            match &g.mig {
                Some(mig) => format!(" [MIG {}]", mig.describe()),
                None if g.shared => " [shared: estimated]".to_owned(),
                None => String::new(),
            }
        );
        if let Some(e) = &g.efficiency {
            for line in format::gpu_efficiency(e) {
                let _ = writeln!(s, "      {line}");
            }
        }
    }
    let idle = format::idle_gpus(
        m.gpus.iter().filter_map(|g| {
            g.efficiency
                .as_ref()
                .map(|e| (format!("gpu{}", g.index), e, g.energy_j))
        }),
        t.energy_j,
    );
    for (k, line) in idle.iter().enumerate() {
        let head = if k == 0 { "Idle GPUs" } else { "" };
        let _ = writeln!(s, "{head:<11}{line}");
    }
    let _ = writeln!(s, "  CPU      {}", opt_energy(t.cpu_j));
    for k in &m.sockets {
        let _ = writeln!(
            s,
            "    socket {}: package {}, DRAM {}",
            k.socket,
            format::energy(k.package_j),
            opt_energy(k.dram_j)
        );
    }
    let _ = writeln!(s, "  DRAM     {}", opt_energy(t.dram_j));
    if !m.steps.is_empty() {
        let _ = writeln!(s, "Steps");
        for st in &m.steps {
            let secs = st.end_unix_ns.saturating_sub(st.start_unix_ns) as f64 / 1e9;
            let _ = writeln!(
                s,
                "  {:<16} {:>10}  over {}",
                step_name(m.job.job_id, st.step),
                format::energy(st.energy_j),
                format::duration(secs)
            );
        }
    }
    if let Some(w) = &m.wall {
        let _ = writeln!(s, "{}", wall_text(w));
    }
    let _ = writeln!(
        s,
        "Node       {} measured on the node over the job; {} idle, {} unattributed",
        format::energy(m.node_context.node_energy_j),
        format::energy(m.node_context.idle_j),
        format::energy(m.node_context.unattributed_j)
    );
    let _ = writeln!(
        s,
        "Method     {} v{}{}",
        m.attribution.model,
        m.attribution.version,
        if m.attribution.estimated {
            " (parts estimated)"
        } else {
            ""
        }
    );
    for g in &m.coverage.gaps {
        let _ = writeln!(
            s,
            "Gap        {}{}: {}",
            format::duration(g.end_unix_ns.saturating_sub(g.start_unix_ns) as f64 / 1e9),
            if g.recovered {
                " (energy recovered)"
            } else {
                " (energy unknown)"
            },
            g.reason
        );
    }
    if let Some(line) = estimate_text(m, factors) {
        let _ = writeln!(s, "{line}");
    }
    if let Some(p) = manifest_path {
        let _ = writeln!(s, "Manifest   {}", p.display());
    }
    if other_nodes(m).is_none() {
        let _ = writeln!(
            s,
            "Accounting: `ergon report {}` once the site's accounting has run.",
            job_label(m)
        );
    }
    s
}

#[derive(Serialize)]
struct JsonReport<'a> {
    job_id: u32,
    /// `<array job id>_<task id>` for an array task, else the job id.
    job: String,
    cluster: &'a str,
    node: &'a str,
    /// Every node of the job (absent where the plugin did not say).
    #[serde(skip_serializing_if = "Option::is_none")]
    job_nodes: Option<Vec<String>>,
    /// What the figures cover: `"job"`, or `"node"` when the job ran on several nodes and
    /// this is one node's part (the whole job: `ergon report`).
    covers: &'static str,
    duration_s: f64,
    coverage: f64,
    energy_j: f64,
    gpu_j: Option<f64>,
    cpu_j: Option<f64>,
    dram_j: Option<f64>,
    avg_w: f64,
    peak_w: f64,
    gpus: &'a [ergon_protocol::GpuEnergy],
    /// Energy of the allocated GPUs that sat idle (`gpus[].efficiency.idle`); absent where no
    /// GPU's utilisation was sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_gpu_j: Option<f64>,
    /// CO2e and cost estimated with ergond's static `[report]` factors (absent without them).
    #[serde(skip_serializing_if = "Option::is_none")]
    footprint_estimate: Option<Estimate>,
    sockets: &'a [ergon_protocol::SocketEnergy],
    steps: &'a [ergon_protocol::StepEnergy],
    gaps: &'a [ergon_protocol::Gap],
    attribution: &'a ergon_protocol::AttributionInfo,
    /// The job's energy at the wall (absent without a node meter).
    #[serde(skip_serializing_if = "Option::is_none")]
    wall: Option<&'a ergon_protocol::manifest::WallEnergy>,
    manifest: Option<String>,
    content_hash: &'a str,
}

/// The JSON report: the manifest's figures without its trace (one object, a newline at the end).
pub fn render_json(m: &Manifest, manifest_path: Option<&Path>, factors: &Factors) -> String {
    let r = JsonReport {
        job_id: m.job.job_id,
        job: job_label(m),
        cluster: &m.cluster,
        node: &m.node,
        job_nodes: m.job.nodes(),
        covers: if other_nodes(m).is_some() {
            "node"
        } else {
            "job"
        },
        duration_s: m.duration_s,
        coverage: m.coverage.fraction,
        energy_j: m.totals.energy_j,
        gpu_j: m.totals.gpu_j,
        cpu_j: m.totals.cpu_j,
        dram_j: m.totals.dram_j,
        avg_w: m.totals.avg_w,
        peak_w: m.totals.peak_w,
        gpus: &m.gpus,
        idle_gpu_j: m.idle_gpu_j(),
        footprint_estimate: factors.estimate(m.totals.energy_j),
        sockets: &m.sockets,
        steps: &m.steps,
        gaps: &m.coverage.gaps,
        attribution: &m.attribution,
        wall: m.wall.as_ref(),
        manifest: manifest_path.map(|p| p.display().to_string()),
        content_hash: &m.content_hash,
    };
    let mut s = serde_json::to_string_pretty(&r).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

/// Why a report could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// A step in the writer failed with `errno`.
    #[error("{path}: {what} failed as uid {uid}: {source_text}")]
    Failed {
        /// The file.
        path: String,
        /// The uid it ran as.
        uid: u32,
        /// Which step.
        what: &'static str,
        /// The OS error's text.
        source_text: String,
        /// The errno.
        errno: i32,
    },
    /// The file is not a regular file (a FIFO, a device, a directory).
    #[error("{0}: not a regular file; refused")]
    NotRegular(String),
    /// The writer did not finish in time (hung filesystem) and was killed.
    #[error("{0}: writing did not finish within {1:?}; gave up")]
    Timeout(String, Duration),
    /// The writer process could not be started, or ended without saying how it went.
    #[error("cannot run the writer process: {0}")]
    Spawn(String),
}

/// The steps of the writer, in order, as its answer names them.
const STEPS: [&str; 5] = ["setgroups", "setgid", "setuid", "open", "write"];

/// The writer's answer on success; a failure is `failed <step> <errno>` or [`NOT_REGULAR`].
const OK: &str = "ok";
const NOT_REGULAR: &str = "not-regular";

/// Writes reports by running the writer: `ergond write-report` (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    program: PathBuf,
    timeout: Duration,
    private: bool,
}

impl Writer {
    /// The writer of this process's own binary: `/proc/self/exe`, which is the running
    /// executable even after an upgrade replaced its file, so ergond and its writer always
    /// agree.
    pub fn this_binary() -> Self {
        Self::new("/proc/self/exe")
    }

    /// The writer of the `ergond` binary at `program`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            timeout: WRITE_TIMEOUT,
            private: false,
        }
    }

    /// Create report files 0600 instead of 0644 (private job data).
    pub fn private(self, private: bool) -> Self {
        Self { private, ..self }
    }

    /// Wait at most `timeout` for each file (default [`WRITE_TIMEOUT`]).
    pub fn timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// Write `bytes` to `target` as `uid`/`gid`.
    pub fn write(
        &self,
        target: &Target,
        uid: u32,
        gid: u32,
        bytes: &[u8],
    ) -> Result<(), WriteError> {
        let path_text = target.path().display().to_string();
        let (flag, path) = match target {
            Target::Append(p) => ("--append", p),
            Target::Create(p) => ("--create", p),
        };
        let mut child = Command::new(&self.program)
            .arg("write-report")
            .args(["--uid", &uid.to_string(), "--gid", &gid.to_string()])
            .args(self.private.then_some("--private"))
            .arg(flag)
            .arg(path)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| WriteError::Spawn(format!("{}: {e}", self.program.display())))?;
        // The bytes go in and the answer comes out on a thread of its own, so that a writer
        // stuck on a hung filesystem costs this thread at most WRITE_TIMEOUT.
        let (mut stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let bytes = bytes.to_vec();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("ergond-report-io".into())
            .spawn(move || {
                if let Some(mut w) = stdin.take() {
                    // A writer that failed early closes its end: its answer says why.
                    let _ = w.write_all(&bytes);
                }
                let mut answer = String::new();
                if let Some(out) = stdout {
                    // Bounded: the answer is one short line.
                    let _ = out.take(256).read_to_string(&mut answer);
                }
                let _ = tx.send(answer);
            })
            .map_err(|e| WriteError::Spawn(e.to_string()))?;
        let answer = match rx.recv_timeout(self.timeout) {
            Ok(answer) => answer,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(WriteError::Timeout(path_text, self.timeout));
            }
        };
        let status = child.wait().map_err(|e| WriteError::Spawn(e.to_string()))?;
        let words: Vec<&str> = answer.split_whitespace().collect();
        match words.as_slice() {
            [OK] if status.success() => Ok(()),
            [NOT_REGULAR] => Err(WriteError::NotRegular(path_text)),
            ["failed", step, errno] => {
                let what = STEPS.iter().copied().find(|s| s == step).unwrap_or("write");
                let errno: i32 = errno.parse().unwrap_or(0);
                Err(WriteError::Failed {
                    path: path_text,
                    uid,
                    what,
                    source_text: std::io::Error::from_raw_os_error(errno).to_string(),
                    errno,
                })
            }
            _ => Err(WriteError::Spawn(format!(
                "{} write-report ended ({status}) without saying how it went",
                self.program.display()
            ))),
        }
    }

    /// Write the report to the first target that takes it. Returns the file written, or every
    /// target's error.
    pub fn deliver(
        &self,
        targets: &[Target],
        uid: u32,
        gid: u32,
        text: &str,
    ) -> Result<PathBuf, Vec<WriteError>> {
        let mut errors = Vec::new();
        for t in targets {
            match self.write(t, uid, gid, text.as_bytes()) {
                Ok(()) => return Ok(t.path().to_path_buf()),
                Err(e) => errors.push(e),
            }
        }
        Err(errors)
    }
}

/// The writer's side, `ergond write-report`: started by ergond as root, it becomes `uid`/`gid`
/// (with `gid` as its only group) before anything else, then writes its standard input to
/// `target` and answers on its standard output (one line: `ok`, `not-regular`, or
/// `failed <step> <errno>`). Returns the exit status: 0 when written.
/// `private`: a file created is 0600, not 0644 (an appended file keeps its mode).
pub fn writer_main(target: &Target, uid: u32, gid: u32, private: bool) -> u8 {
    let answer = match become_user_and_write(target, uid, gid, private) {
        Ok(()) => OK.to_owned(),
        Err(Refused::NotRegular) => NOT_REGULAR.to_owned(),
        Err(Refused::Failed(step, errno)) => format!("failed {} {errno}", STEPS[step as usize]),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{answer}");
    let _ = out.flush();
    u8::from(answer != OK)
}

/// A step of the writer (an index into [`STEPS`]).
#[derive(Clone, Copy)]
enum Step {
    SetGroups,
    SetGid,
    SetUid,
    Open,
    Write,
}

enum Refused {
    Failed(Step, i32),
    NotRegular,
}

fn become_user_and_write(
    target: &Target,
    uid: u32,
    gid: u32,
    private: bool,
) -> Result<(), Refused> {
    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
    use std::os::unix::fs::OpenOptionsExt as _;
    let errno = |step: Step| move |e: nix::errno::Errno| Refused::Failed(step, e as i32);
    let io_errno =
        |step: Step| move |e: std::io::Error| Refused::Failed(step, e.raw_os_error().unwrap_or(0));
    // Privileges first: nothing below runs as root. Changing credentials also makes this process
    // non-dumpable, so the user cannot attach to it while it holds root's descriptors.
    setgroups(&[Gid::from_raw(gid)]).map_err(errno(Step::SetGroups))?;
    setgid(Gid::from_raw(gid)).map_err(errno(Step::SetGid))?;
    setuid(Uid::from_raw(uid)).map_err(errno(Step::SetUid))?;
    if uid != 0 && setuid(Uid::from_raw(0)).is_ok() {
        return Err(Refused::Failed(Step::SetUid, libc::EPERM));
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(io_errno(Step::Write))?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let mut options = std::fs::OpenOptions::new();
    // O_NOFOLLOW: a symlink is refused; O_NONBLOCK: opening a FIFO does not wait for a reader.
    options
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .mode(if private { 0o600 } else { 0o644 });
    match target {
        Target::Append(_) => options.append(true),
        // O_CREAT | O_EXCL: nothing existing is replaced.
        Target::Create(_) => options.write(true).create_new(true),
    };
    let mut file = options.open(target.path()).map_err(io_errno(Step::Open))?;
    match file.metadata() {
        Ok(md) if md.file_type().is_file() => {}
        _ => return Err(Refused::NotRegular),
    }
    file.write_all(&bytes).map_err(io_errno(Step::Write))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Job 42 on n1: 65 s, one GPU (10 kJ), one socket (2 kJ package, 300 J DRAM).
    fn manifest() -> Manifest {
        ergon_protocol::testing::ManifestBuilder::new("c", 42, "n1")
            .span(0, 65_000_000_000)
            .gpu(Some(10_000.0))
            .socket(2000.0, Some(300.0))
            .peak_w(412.0)
            .node_context(20_000.0, 100.0, 7600.0)
            .batch_step()
            .build()
    }

    /// With static factors the report estimates CO2e and cost (× PUE), names the factors and
    /// points at the accounting's figures; without, it says nothing of them.
    #[test]
    fn static_factors_give_a_co2e_and_cost_estimate_said_to_be_one() {
        let m = manifest();
        let e = m.totals.energy_j;
        let f = Factors {
            co2e_g_per_kwh: Some(400.0),
            pue: Some(1.5),
            price_per_kwh: Some(0.2),
            currency: Some("EUR".into()),
            source: Some("site average 2026".into()),
        };
        let est = f.estimate(e).unwrap();
        assert!((est.co2e_g.unwrap() - e / 3.6e6 * 1.5 * 400.0).abs() < 1e-9);
        assert!((est.cost.unwrap() - e / 3.6e6 * 1.5 * 0.2).abs() < 1e-12);
        let t = render_text(&m, None, &f);
        let line = t
            .lines()
            .find(|l| l.starts_with("Footprint"))
            .unwrap_or_else(|| panic!("{t}"));
        assert!(
            line.contains(&format::co2e(est.co2e_g.unwrap()))
                && line.contains(&format!("{:.4} EUR", est.cost.unwrap()))
                && line.contains(
                    "PUE 1.5 × 400 gCO2e/kWh, 0.2 EUR/kWh, static factors (site average 2026)"
                ),
            "{t}"
        );
        assert!(
            t.contains("over the power trace with the site's factors: `ergon report 42`"),
            "{t}"
        );
        let j: serde_json::Value = serde_json::from_str(&render_json(&m, None, &f)).unwrap();
        assert_eq!(j["footprint_estimate"]["pue"], 1.5);
        assert_eq!(j["footprint_estimate"]["currency"], "EUR");
        // Only an intensity: CO2e alone; nothing: no line, no JSON member.
        let co2_only = Factors {
            co2e_g_per_kwh: Some(100.0),
            ..Factors::default()
        };
        let t = render_text(&m, None, &co2_only);
        assert!(
            t.contains("CO2e: ")
                && t.contains("× 100 gCO2e/kWh, static factors.")
                && !t.contains(" and "),
            "{t}"
        );
        let none = render_text(&m, None, &Factors::default());
        assert!(!none.contains("Footprint"), "{none}");
        let j: serde_json::Value =
            serde_json::from_str(&render_json(&m, None, &Factors::default())).unwrap();
        assert!(j.get("footprint_estimate").is_none());
    }

    #[test]
    fn the_wall_line_names_the_meter_and_the_split_and_is_absent_without_one() {
        let mut m = manifest();
        let plain = render_text(&m, None, &Factors::default());
        assert!(!plain.contains("At the wall"));
        m.wall = Some(ergon_protocol::manifest::WallEnergy {
            energy_j: 150_000.0,
            components_j: 120_000.0,
            rest_of_node_j: 30_000.0,
            rule: "allocation".into(),
            meter: ergon_protocol::manifest::WallMeter {
                kind: "hwmon".into(),
                source: "/sys/class/hwmon/hwmon2".into(),
                resolution_s: 1.0,
                accuracy_percent: 5.0,
            },
            metered_s: 100.0,
            unmetered_s: 0.0,
            disagreements: 0,
            disagreement_intervals: vec![],
        });
        let t = render_text(&m, None, &Factors::default());
        let line = t.lines().find(|l| l.starts_with("At the wall")).unwrap();
        assert!(line.contains(&format::energy(150_000.0)), "{line}");
        assert!(
            line.contains(&format!("components {}", format::energy(120_000.0))),
            "{line}"
        );
        assert!(
            line.contains(&format!("rest of node {}", format::energy(30_000.0))),
            "{line}"
        );
        assert!(line.contains("hwmon /sys/class/hwmon/hwmon2"), "{line}");
        assert!(
            line.contains("resolution") && line.contains("by allocation"),
            "{line}"
        );
        assert!(!t.contains("did not cover") && !t.contains("beyond its"));
        let w = m.wall.as_mut().unwrap();
        w.disagreements = 3;
        w.unmetered_s = 2.0;
        let t = render_text(&m, None, &Factors::default());
        assert!(
            t.contains("in 3 interval(s), beyond its 5% accuracy"),
            "{t}"
        );
        assert!(t.contains("the meter did not cover is not included"), "{t}");
        let j: serde_json::Value =
            serde_json::from_str(&render_json(&m, None, &Factors::default())).unwrap();
        assert_eq!(j["wall"]["rest_of_node_j"], 30_000.0);
    }

    #[test]
    fn a_mig_share_is_named_with_its_instances_and_method() {
        let mut m = manifest();
        m.gpus[0].shared = true;
        m.gpus[0].mig = Some(ergon_protocol::GpuMig {
            total_slices: 7,
            instances: vec![ergon_protocol::MigInstanceRef {
                gpu_instance_id: 2,
                compute_instance_id: Some(0),
                slices: Some(3),
                uuid: Some("MIG-x".into()),
            }],
            share_method: ergon_protocol::MigShareMethod::SliceSize,
        });
        let t = render_text(&m, None, &Factors::default());
        assert!(
            t.contains("[MIG GI 2 (3 of 7 slices), estimated by slice size]"),
            "{t}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&render_json(&m, None, &Factors::default())).unwrap();
        assert_eq!(j["gpus"][0]["mig"]["total_slices"], 7);
    }

    fn efficiency(util: Option<f64>) -> ergon_protocol::GpuEfficiency {
        ergon_protocol::GpuEfficiency {
            sampled_s: 65.0,
            partial: false,
            sm_util_avg_pct: util,
            idle: util.map(|u| u < 5.0),
            idle_threshold_pct: 5.0,
            memory_used_max_bytes: Some(3 << 30),
            temperature_max_c: Some(61),
            sm_clock_avg_mhz: Some(1410.0),
            mem_clock_avg_mhz: None,
            throttle_s: ergon_protocol::ThrottleSeconds {
                power_cap: Some(12.5),
                sw_thermal: None,
                hw_thermal: Some(3.0),
                hw_power_brake: None,
            },
            ecc_corrected: Some(2),
            ecc_uncorrected: Some(0),
            xid_count: Some(1),
            xids: Some(vec![ergon_protocol::XidEvent {
                at_unix_ns: 1,
                xid: 79,
            }]),
        }
    }

    #[test]
    fn the_report_names_an_idle_gpu_its_energy_and_each_gpu_figure() {
        let m = ergon_protocol::testing::ManifestBuilder::new("c", 42, "n1")
            .span(0, 65_000_000_000)
            .gpu(Some(412_000.0))
            .gpu_efficiency(efficiency(Some(1.0)))
            .gpu(Some(100_000.0))
            .gpu_efficiency(efficiency(Some(80.0)))
            .gpu(Some(50_000.0))
            .gpu_efficiency(ergon_protocol::GpuEfficiency {
                sm_util_avg_pct: None,
                idle: None,
                memory_used_max_bytes: None,
                xid_count: None,
                xids: None,
                ..efficiency(None)
            })
            .build();
        assert_eq!(m.schema_version, 6);
        let t = render_text(&m, None, &Factors::default());
        for want in [
            "Idle GPUs  gpu0: 1 % average SM utilisation, 412 kJ spent idle",
            "412 kJ of the job's 562 kJ (73.3%) went to allocated GPUs that sat idle \
             (average SM utilisation below 5 %)",
            "average SM utilisation 80 %, memory used at most 3.0 GiB, temperature at most 61 °C, \
             average SM clock 1410 MHz; not reported: memory clock",
            "throttled 15.5 s (power cap 12.5 s, hw thermal 3.0 s)",
            "ECC errors 2 corrected, 0 uncorrected; 1 Xid event(s): 79",
            "temperature at most 61 °C, average SM clock 1410 MHz; not reported: SM utilisation, \
             memory used, memory clock",
            "Xid events not reported",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
        assert!(!t.contains("gpu1: "), "a busy GPU is not idle:\n{t}");
        let j: serde_json::Value =
            serde_json::from_str(&render_json(&m, None, &Factors::default())).unwrap();
        assert_eq!(j["idle_gpu_j"], 412_000.0);
        assert_eq!(j["gpus"][0]["efficiency"]["throttle_s"]["power_cap"], 12.5);
        assert!(j["gpus"][2]["efficiency"]["sm_util_avg_pct"].is_null());
        let plain = render_json(&manifest(), None, &Factors::default());
        assert!(!plain.contains("idle_gpu_j"), "{plain}");
    }

    #[test]
    fn text_names_every_component_and_gpu() {
        let t = render_text(
            &manifest(),
            Some(Path::new("/var/spool/ergon/c-42-n1.json")),
            &Factors::default(),
        );
        for want in [
            "job 42 on n1",
            "1 min 5 s",
            "12.3 kJ",
            "average 189.2 W, peak 412.0 W",
            "gpu0 GPU-n1-0 (minor 0): 10.0 kJ, average 153.8 W, peak 307.7 W",
            "CPU      2.00 kJ",
            "DRAM     300 J",
            "42.batch",
            "coverage 100.0%",
            "/var/spool/ergon/c-42-n1.json",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
        let j: serde_json::Value =
            serde_json::from_str(&render_json(&manifest(), None, &Factors::default())).unwrap();
        assert_eq!(j["energy_j"], 12300.0);
        assert_eq!(j["gpus"][0]["uuid"], "GPU-n1-0");
        assert!(j.get("trace").is_none());
    }

    #[test]
    fn targets_prefer_stdout_for_text_on_the_batch_node() {
        let m = manifest();
        let t = targets(
            &m,
            ReportFormat::Text,
            Some("/home/a/slurm-42.out"),
            Some("/home/a"),
            true,
        );
        assert_eq!(
            t,
            vec![
                Target::Append("/home/a/slurm-42.out".into()),
                Target::Create("/home/a/ergon-42.txt".into())
            ]
        );
        let t = targets(
            &m,
            ReportFormat::Json,
            Some("/home/a/slurm-42.out"),
            Some("/home/a"),
            false,
        );
        assert_eq!(t, vec![Target::Create("/home/a/ergon-42.n1.json".into())]);
        // Relative or missing paths are never used.
        assert!(targets(
            &m,
            ReportFormat::Text,
            Some("slurm.out"),
            Some("rel"),
            false
        )
        .is_empty());
        assert!(targets(&m, ReportFormat::Text, Some("slurm.out"), Some("rel"), true).is_empty());
    }

    #[test]
    fn one_naming_scheme_for_both_formats_safe_for_several_nodes_and_arrays() {
        let mut m = manifest();
        // One node: no node in the name, batch node or not, once the job's nodes are known.
        m.job.node_list = Some("n1".into());
        for batch in [true, false] {
            assert_eq!(file_name(&m, ReportFormat::Text, batch), "ergon-42.txt");
            assert_eq!(file_name(&m, ReportFormat::Json, batch), "ergon-42.json");
        }
        // Several nodes: every node's report names its node, in both formats, so that nodes
        // sharing a working directory never want the same file.
        m.job.node_list = Some("n[1-2]".into());
        let mut names = std::collections::BTreeSet::new();
        for node in ["n1", "n2"] {
            m.node = node.into();
            for format in [ReportFormat::Text, ReportFormat::Json] {
                for batch in [true, false] {
                    let name = file_name(&m, format, batch);
                    assert!(name.starts_with(&format!("ergon-42.{node}.")), "{name}");
                    names.insert((name, batch));
                }
            }
        }
        assert_eq!(
            names
                .iter()
                .map(|(n, _)| n)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            4
        );
        // An array task: `%A_%a`, as Slurm names its output.
        m.job.array_job_id = Some(40);
        m.job.array_task_id = Some(2);
        assert_eq!(
            file_name(&m, ReportFormat::Json, true),
            "ergon-40_2.n2.json"
        );
        m.job.node_list = None;
        assert_eq!(file_name(&m, ReportFormat::Text, true), "ergon-40_2.txt");
        assert_eq!(
            file_name(&m, ReportFormat::Text, false),
            "ergon-40_2.n2.txt"
        );
    }

    #[test]
    fn a_node_of_a_multi_node_job_says_what_its_report_covers() {
        let mut m = manifest();
        let t = render_text(&m, None, &Factors::default());
        assert!(
            !t.contains("Scope") && t.contains("`ergon report 42`"),
            "{t}"
        );
        m.job.node_list = Some("n[1-3]".into());
        let t = render_text(&m, None, &Factors::default());
        assert!(
            t.contains("this job ran on 3 nodes (n1, n2, n3); this report covers n1 only")
                && t.contains("The whole job: `ergon report 42`"),
            "{t}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&render_json(&m, None, &Factors::default())).unwrap();
        assert_eq!(j["covers"], "node");
        assert_eq!(j["job_nodes"][2], "n3");
        m.job.node_list = Some("n[1-64]".into());
        let t = render_text(&m, None, &Factors::default());
        assert!(
            t.contains("64 nodes (n1, n2, n3, n4, n5, n6, … and 58 more)"),
            "{t}"
        );
        m.job.node_list = None;
        let j: serde_json::Value =
            serde_json::from_str(&render_json(&m, None, &Factors::default())).unwrap();
        assert_eq!(j["covers"], "job");
        assert!(j.get("job_nodes").is_none());
    }
}
