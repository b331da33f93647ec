//! `ergon`, ergon's accounting tool and user CLI.
//!
//! Exit codes of `ergon run`:
//! - 0: everything collected and delivered;
//! - 1: error (config, state, spool unreadable): nothing was lost, the next run retries;
//! - 2: usage error;
//! - 3: ran, but not everything went through (records pending for a later run, manifests
//!   quarantined, records dropped by a bound); `ergon status` says what;
//! - 4: a sink refused its credentials (401/403): an admin must fix the token;
//! - 75: another `ergon run` holds the lock; this one did nothing.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ergon_accounting::config::{Config, DEFAULT_PATH};
use ergon_accounting::report;
use ergon_accounting::run::{run, RunOptions};
use ergon_accounting::state::LockError;

/// ergon collects the energy manifests written by ergond, puts each job's energy into sacct and
/// uploads job records to a site's data store; users run `ergon report JOBID`.
#[derive(Debug, Parser)]
#[command(name = "ergon", version, about, long_about = None, arg_required_else_help = true)]
struct Args {
    /// The config file.
    #[arg(long, global = true, default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Collect manifests, write sacct records, upload (the cron entry point).
    ///
    /// Exit codes: 0 all done; 1 error; 3 something still pending, quarantined or dropped
    /// (see `ergon status`); 4 a sink refused its credentials; 75 another run holds the lock.
    Run {
        /// Report what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Backlog, last success per destination, quarantined and dropped counts.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A job's energy, from sacct and (when readable) the manifests.
    Report {
        /// The job id.
        job_id: u32,
        /// The cluster (default: sacct's).
        #[arg(long)]
        cluster: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Exit code when another run holds the lock (EX_TEMPFAIL).
const EXIT_LOCKED: u8 = 75;

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ERGON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            if let Some(LockError::Busy(_)) = e.downcast_ref::<LockError>() {
                eprintln!("ergon: {e}");
                return ExitCode::from(EXIT_LOCKED);
            }
            eprintln!("ergon: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_config(path: &std::path::Path, required: bool) -> anyhow::Result<Config> {
    match Config::load(path) {
        Ok(c) => Ok(c),
        Err(ergon_accounting::config::ConfigError::Read { source, .. })
            if !required && source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(Config::parse("", path)?)
        }
        Err(e) => Err(e.into()),
    }
}

fn real_main(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Cmd::Run { dry_run } => {
            let config = load_config(&args.config, true)?;
            let summary = run(
                &config,
                RunOptions {
                    dry_run,
                    progress: std::io::stderr().is_terminal(),
                },
            )?;
            if dry_run {
                return Ok(ExitCode::SUCCESS);
            }
            tracing::info!("{}", summary.line());
            tracing::debug!("timings: {:?}", summary.timings);
            if !summary.auth_refused.is_empty() {
                return Ok(ExitCode::from(4));
            }
            Ok(if summary.complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Cmd::Status { json } => {
            let config = load_config(&args.config, true)?;
            let status = report::status(&config)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", report::render_status(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report {
            job_id,
            cluster,
            json,
        } => {
            // Users may not be able to read the admin's config: fall back to defaults.
            let config = load_config(&args.config, false)
                .or_else(|_| Config::parse("", &args.config))
                .context("reading the config")?;
            let r = report::job_report(&config, cluster.as_deref(), job_id);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", report::render_job_report(&r));
            }
            Ok(if r.sacct_record.is_some() || r.manifests.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
