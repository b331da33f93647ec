//! `ergond`, the ergon node daemon.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

/// ergond samples GPU (NVML) and CPU (RAPL) energy counters on a Slurm compute node and
/// attributes the energy to the jobs running there.
///
/// Without a subcommand, ergond runs as the node service: it samples every GPU and RAPL zone
/// and serves Prometheus metrics (per-GPU and per-zone energy and power, node totals, sampler
/// health) at http://<metrics_listen>/metrics (default 127.0.0.1:9713) until SIGTERM or SIGINT.
/// Logs go to stderr, or to the journal when stderr is connected to it (see --log); RUST_LOG
/// sets the level, default info. Under systemd (Type=notify) it reports readiness, STATUS= and
/// STOPPING=, and pings the watchdog (WatchdogSec=) while the sampler ticks.
///
/// It also serves the SPANK plugin's socket (socket_path, default /run/ergon/ergond.sock) and
/// writes one manifest per job into spool_dir when the job ends: GPU, CPU package and DRAM
/// energy attributed to the job, the node's idle and unattributed energy, coverage and gaps.
/// Open jobs are journaled in state_dir, so a restart (even kill -9) loses no job; jobs that
/// asked for --energy-report get a report written as their user.
///
/// Exit status of the service: 0 after a clean stop, 1 if the configuration is invalid or it
/// cannot start, 2 if no energy source works on this node.
#[derive(Debug, Parser)]
#[command(name = "ergond", version, about, long_about)]
struct Args {
    /// Configuration file (TOML) [default: /etc/ergon/ergond.toml; if that file does not
    /// exist, built-in defaults are used. A file given here must exist.]
    #[arg(long, short, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Where the service logs: auto = the journal (native protocol) when stderr is connected to
    /// it (JOURNAL_STREAM), else stderr.
    #[arg(long, value_enum, default_value_t = ergond::systemd::LogTarget::Auto)]
    log: ergond::systemd::LogTarget,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and list what this node can measure.
    ///
    /// Loads the configuration (errors name the key), opens each source and prints: the NVML
    /// library and driver versions; every GPU (index, minor, UUID, PCI bus id, name) with its
    /// energy method (counter, integrated power or unsupported, and why) and its detected
    /// counter update period (about 1 s in total); the RAPL backend (perf or powercap) and
    /// zones with their wrap range; the cgroup version. A source that cannot be opened is
    /// printed as a PROBLEM line saying what failed and what to do.
    ///
    /// Exit status: 0 if the configuration is valid and at least one energy source works, 1 if
    /// the configuration is invalid, 2 if no energy source works.
    Check {
        /// Print the inventory as one JSON object (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Measure the NVML read path of this node's GPUs.
    ///
    /// Samples every GPU every PERIOD_MS for SECONDS on one dedicated thread (absolute
    /// monotonic-clock deadlines), reading them exactly as ergond does, and reports per GPU:
    /// the observed update period of the energy counter and of the power reading (min /
    /// median / mean interval between changes), the latency of each NVML call per read
    /// (p50 / p99 / max µs), and the energy of the same interval by counter difference and
    /// by integrating the sampled power, with their relative difference.
    ///
    /// Exit status: 0 on success, 1 if the configuration is invalid, 2 if no GPU can be read.
    Probe {
        /// How long to sample, in seconds.
        #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
        seconds: f64,
        /// Sampling period in milliseconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        period_ms: u64,
        /// Print the report as one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a job's energy report as its user (run by ergond itself, as root; see
    /// docs/operations.md): become UID and GID, then write standard input to PATH, never
    /// through a symlink, never into a FIFO or device, and with --create never over an
    /// existing file. Answers one line on standard output.
    #[command(hide = true)]
    WriteReport {
        /// The user to write as.
        #[arg(long)]
        uid: u32,
        /// The group to write as (the only group the writer keeps).
        #[arg(long)]
        gid: u32,
        /// Create the file 0600 (private job data), not 0644.
        #[arg(long)]
        private: bool,
        /// Append to this existing file.
        #[arg(
            long,
            value_name = "PATH",
            conflicts_with = "create",
            required_unless_present = "create"
        )]
        append: Option<PathBuf>,
        /// Create this file.
        #[arg(long, value_name = "PATH")]
        create: Option<PathBuf>,
    },
    /// Write the man pages (ergond.8, ergond-check.8, ...) into DIR (used by scripts/install).
    #[command(long_flag = "generate-man", hide = true)]
    GenerateMan {
        /// Directory to write the pages into (must exist).
        dir: PathBuf,
    },
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds ({e})"))?;
    if v.is_finite() && v > 0.0 && v <= 3600.0 {
        Ok(v)
    } else {
        Err(format!("{v} s is outside (0, 3600] s"))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Command::Check { json }) => {
            ExitCode::from(ergond::inventory::run_check(args.config.as_ref(), json))
        }
        Some(Command::Probe {
            seconds,
            period_ms,
            json,
        }) => ExitCode::from(ergond::probe::run_probe(
            args.config.as_ref(),
            seconds,
            period_ms,
            json,
        )),
        Some(Command::WriteReport {
            uid,
            gid,
            private,
            append,
            create,
        }) => {
            use ergond::jobs::report::{writer_main, Target};
            let target = match (append, create) {
                (Some(p), _) => Target::Append(p),
                (None, Some(p)) => Target::Create(p),
                (None, None) => unreachable!("clap requires --append or --create"),
            };
            ExitCode::from(writer_main(&target, uid, gid, private))
        }
        Some(Command::GenerateMan { dir }) => match write_man_pages(Args::command(), "8", &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "ergond: cannot write the man pages into {}: {e}",
                    dir.display()
                );
                ExitCode::from(1)
            }
        },
        None => ExitCode::from(ergond::service::run(args.config.as_deref(), args.log)),
    }
}

/// One roff page per command and visible subcommand (`ergond.8`, `ergond-check.8`, ...).
fn write_man_pages(
    cmd: clap::Command,
    section: &str,
    dir: &std::path::Path,
) -> std::io::Result<()> {
    fn write(cmd: clap::Command, section: &str, dir: &std::path::Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), section, dir)?;
        }
        clap_mangen::Man::new(cmd)
            .section(section)
            .source(concat!("ergon ", env!("CARGO_PKG_VERSION")))
            .manual("ergon")
            .generate_to(dir)
            .map(drop)
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    write(cmd, section, dir)
}
