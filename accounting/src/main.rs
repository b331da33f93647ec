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
//!
//! Exit codes of `ergon plot`:
//! - 0: the picture was written;
//! - 1: error (no manifests of the job, a manifest of the job that does not verify, no power
//!   trace in them, the file cannot be written): see the message; no file was written;
//! - 2: usage error, including an output name that ends in neither `.svg` nor `.png`.

#![deny(unsafe_code)]

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use ergon_accounting::config::{Config, DEFAULT_PATH};
use ergon_accounting::plot;
use ergon_accounting::records;
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
    /// Write the man pages (ergon.1, ergon-run.1, ...) into DIR (used by scripts/install).
    #[command(long_flag = "generate-man", hide = true)]
    GenerateMan {
        /// Directory to write the pages into (must exist).
        dir: PathBuf,
    },
    /// Collect manifests, write sacct records, upload (the cron entry point).
    ///
    /// Exit codes: 0 all done; 1 error; 3 something still pending, quarantined or dropped
    /// (see `ergon status`); 4 a sink refused its credentials; 75 another run holds the lock.
    Run {
        /// Report what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// List every node directory of the sharded spool, sealed ones too (whose manifests an
        /// earlier run found all delivered and that have not changed since): for a directory
        /// whose files were changed in place, which leaves its modification time as it was.
        #[arg(long)]
        rescan: bool,
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
    /// Remove manifests from the spools once every destination has their job's record.
    ///
    /// Only files the state knows as collected and unchanged, of jobs with nothing pending for
    /// any destination, that ended more than --older-than days ago. Takes the run lock. Exit
    /// codes: 0 done; 1 error; 3 some files could not be removed; 75 `ergon run` holds the lock.
    Prune {
        /// Keep the manifests of jobs that ended within this many days (`ergon plot` needs them).
        #[arg(long, value_name = "DAYS", default_value_t = 7)]
        older_than: u64,
        /// Count what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs from the job-records database, newest first.
    ///
    /// Filters combine (AND). Times are UTC: YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS], or @UNIX_SECONDS;
    /// a job is listed by its end. Exit codes: 0 listed (perhaps nothing); 1 the database cannot
    /// be read; 2 usage error.
    Jobs {
        /// Only this user's jobs.
        #[arg(long)]
        user: Option<String>,
        /// Only this account's jobs.
        #[arg(long)]
        account: Option<String>,
        /// Only this cluster's jobs.
        #[arg(long)]
        cluster: Option<String>,
        /// Only jobs that ended at or after this time.
        #[arg(long, value_parser = records::parse_time)]
        since: Option<u64>,
        /// Only jobs that ended before this time.
        #[arg(long, value_parser = records::parse_time)]
        until: Option<u64>,
        /// At most this many jobs (the newest).
        #[arg(long)]
        limit: Option<u64>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = records::JobsFormat::Table)]
        format: records::JobsFormat,
    },
    /// Sum the collected jobs' energy by user, account, partition or node.
    ///
    /// From the job-records database: jobs, energy by component, GPU-hours and node-hours per
    /// group, the lowest coverage, and how many jobs have an estimated part or GPUs of unknown
    /// energy. A user who is not root sees the sums of their own jobs only. Times are UTC:
    /// YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS], or @UNIX_SECONDS; a job counts by its end. Exit codes:
    /// 0 printed (perhaps no jobs); 1 the database cannot be read; 2 usage error.
    Summary {
        /// What to group by.
        #[arg(long, value_enum, default_value_t = records::SummaryBy::User)]
        by: records::SummaryBy,
        /// Only jobs that ended at or after this time.
        #[arg(long, value_parser = records::parse_time)]
        since: Option<u64>,
        /// Only jobs that ended before this time.
        #[arg(long, value_parser = records::parse_time)]
        until: Option<u64>,
        /// Only this cluster's jobs.
        #[arg(long)]
        cluster: Option<String>,
        /// Only this user's jobs.
        #[arg(long)]
        user: Option<String>,
        /// Only this account's jobs.
        #[arg(long)]
        account: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = records::JobsFormat::Table)]
        format: records::JobsFormat,
    },
    /// Draw a job's power over time from its manifests' power traces, as SVG or PNG.
    ///
    /// One line per device per node, the job's and steps' start and end marked, each device's
    /// energy in the legend. Exit codes: 0 written; 1 error (no manifests or no trace; nothing
    /// written); 2 usage error (such as an output name not ending in .svg or .png).
    Plot {
        /// The job id.
        job_id: u32,
        /// The output file: .svg or .png.
        #[arg(short, long, value_parser = parse_plot_output)]
        output: PathBuf,
        /// Read these manifest files instead of searching the spool directories (repeatable).
        #[arg(long = "manifest", value_name = "PATH")]
        manifests: Vec<PathBuf>,
        /// The cluster, when the spools hold manifests of the same job id from several.
        #[arg(long)]
        cluster: Option<String>,
        /// Width in pixels.
        #[arg(long, default_value_t = plot::DEFAULT_WIDTH, value_parser = clap::value_parser!(u32).range(400..=8000))]
        width: u32,
        /// Height in pixels.
        #[arg(long, default_value_t = plot::DEFAULT_HEIGHT, value_parser = clap::value_parser!(u32).range(300..=8000))]
        height: u32,
    },
}

/// `-o` of `ergon plot`: a path whose extension names a format.
fn parse_plot_output(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    plot::Format::from_path(&path).map_err(|e| e.to_string())?;
    Ok(path)
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
        Err(ergon_accounting::config::ConfigError::Read { not_found, .. })
            if !required && not_found =>
        {
            Ok(Config::parse("", path)?)
        }
        Err(e) => Err(e.into()),
    }
}

fn real_main(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Cmd::GenerateMan { dir } => {
            write_man_pages(&dir).with_context(|| format!("writing man pages into {dir:?}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { dry_run, rescan } => {
            let config = load_config(&args.config, true)?;
            // Private job data: the state, quarantine and records database are restricted
            // before this run reads them and again after it wrote new files.
            let (modes, why) = ergon_accounting::privacy::modes(&config)?;
            tracing::debug!(private = modes.private, why = %why.why, "job data privacy");
            if !dry_run {
                ergon_accounting::privacy::restrict(&config, modes)?;
            }
            let summary = run(
                &config,
                RunOptions {
                    dry_run,
                    progress: std::io::stderr().is_terminal(),
                    sequential: false,
                    rescan,
                },
            )?;
            if dry_run {
                return Ok(ExitCode::SUCCESS);
            }
            ergon_accounting::privacy::restrict(&config, modes)?;
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
        Cmd::Prune {
            older_than,
            dry_run,
            json,
        } => {
            let config = load_config(&args.config, true)?;
            let summary = ergon_accounting::prune::prune(
                &config,
                std::time::Duration::from_secs(older_than.saturating_mul(86_400)),
                dry_run,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{}", summary.line(dry_run));
                for e in &summary.errors {
                    eprintln!("ergon: cannot remove {e}");
                }
            }
            Ok(if summary.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Cmd::Jobs {
            user,
            account,
            cluster,
            since,
            until,
            limit,
            format,
        } => {
            let db = match records_for_reading(&args.config, "jobs")? {
                Ok(db) => db,
                Err(code) => return Ok(code),
            };
            let rows = db.list(&records::JobFilter {
                cluster,
                user,
                uid: None,
                account,
                since_unix_ns: since,
                until_unix_ns: until,
                limit,
            })?;
            print!("{}", records::render_jobs(&rows, format));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Summary {
            by,
            since,
            until,
            cluster,
            user,
            account,
            format,
        } => {
            let db = match records_for_reading(&args.config, "summary")? {
                Ok(db) => db,
                Err(code) => return Ok(code),
            };
            // A user who is not root sums their own jobs only, like sacct's PrivateData=jobs.
            let me = rustix::process::getuid().as_raw();
            let uid = (me != 0).then_some(me);
            let filter = records::JobFilter {
                cluster: cluster.clone(),
                user: user.clone(),
                uid,
                account: account.clone(),
                since_unix_ns: since,
                until_unix_ns: until,
                limit: None,
            };
            let rows = db.summary(by, &filter)?;
            let scope = ergon_accounting::summary::Scope {
                by,
                since_unix_ns: since,
                until_unix_ns: until,
                cluster,
                user: user.or_else(|| uid.map(|u| format!("uid {u} (your jobs only)"))),
                account,
            };
            print!(
                "{}",
                ergon_accounting::summary::render(&rows, &scope, format)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plot {
            job_id,
            output,
            manifests,
            cluster,
            width,
            height,
        } => {
            let format = plot::Format::from_path(&output)?;
            let found = if manifests.is_empty() {
                // As for `report`: users may not be able to read the admin's config.
                let config = load_config(&args.config, false)
                    .or_else(|_| Config::parse("", &args.config))
                    .context("reading the config")?;
                plot::find_in_spools(&config.spool_dirs, cluster.as_deref(), job_id)?
            } else {
                plot::read_files(&manifests, cluster.as_deref(), job_id)?
            };
            let picture = plot::build(job_id, &found)?;
            let bytes = plot::render(&picture, format, width, height)?;
            plot::write(&output, &bytes)?;
            eprintln!("ergon: wrote {}", output.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One roff page per command and visible subcommand, section 1 (`ergon.1`, `ergon-run.1`, ...).
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    fn write(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), dir)?;
        }
        clap_mangen::Man::new(cmd)
            .section("1")
            .source(concat!("ergon ", env!("CARGO_PKG_VERSION")))
            .manual("ergon")
            .generate_to(dir)
            .map(drop)
    }
    let mut cmd = Args::command().disable_help_subcommand(true);
    cmd.build();
    write(cmd, dir)
}

/// The job-records database for `ergon jobs` and `ergon summary`, run by any user: read-only, or
/// the exit code once it said why the user cannot read it (the admin's config may be unreadable
/// to them, as for `report`).
fn records_for_reading(
    config_path: &std::path::Path,
    cmd: &str,
) -> anyhow::Result<Result<records::RecordsDb, ExitCode>> {
    let config = load_config(config_path, false)
        .or_else(|_| Config::parse("", config_path))
        .context("reading the config")?;
    if !config.records.enabled {
        anyhow::bail!(
            "the job-records database is disabled ([records] enabled = false in {}): `ergon {cmd}` has nothing to read",
            config_path.display()
        );
    }
    let location = config.records_location();
    if let records::Location::Sqlite(path) = &location {
        if ergon_accounting::privacy::denied(path) {
            eprintln!(
                "ergon: the job-records database {} is readable by root and the ergon group only \
                 (private job data, following Slurm's PrivateData): `ergon {cmd}` is for them; \
                 your own jobs' energy is in sacct (`ergon report JOBID`, or `sacct -o JobID,{}`)",
                path.display(),
                config.sacct.field.name()
            );
            return Ok(Err(ExitCode::from(1)));
        }
    }
    Ok(Ok(records::RecordsDb::open_location_read_only(&location)?))
}
