//! `ergond`, the ergon node daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// ergond samples GPU (NVML) and CPU (RAPL) energy counters on a Slurm compute node and
/// attributes the energy to the jobs running there.
#[derive(Debug, Parser)]
#[command(name = "ergond", version, about, long_about = None)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short, default_value = "/etc/ergon/ergond.toml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "ergond {}: the daemon's service loop is not part of this build yet (config would be read from {}); \
         nothing was started",
        env!("CARGO_PKG_VERSION"),
        args.config.display()
    );
    ExitCode::from(2)
}
