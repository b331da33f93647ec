//! `ergon`, ergon's accounting tool and user CLI.

use clap::Parser;

/// ergon collects the energy manifests written by ergond, puts each job's energy into sacct and
/// uploads job records to a site's data store; users run `ergon report JOBID`.
#[derive(Debug, Parser)]
#[command(name = "ergon", version, about, long_about = None, arg_required_else_help = true)]
struct Args {}

fn main() {
    let _args = Args::parse();
}
