//! `ergond` without a subcommand: the node service.
//!
//! Loads the configuration, opens the energy sources, starts the [`crate::sampler`] threads and
//! serves Prometheus `/metrics` on `metrics_listen` until SIGTERM or SIGINT; then stops the
//! server and the sampler and exits 0. Logs go to stderr through `tracing` (level from
//! `RUST_LOG`, default `info`), which systemd's journal captures.
//!
//! Not here yet: job tracking. The SPANK plugin's socket (`socket_path`) is not served and no
//! energy is attributed to jobs; the log says so at start.
//!
//! Exit status: 0 after a clean stop; 1 if the configuration is invalid or the service cannot
//! start (listen address in use, a sampling thread cannot be created); 2 if no energy source
//! (no GPU, no RAPL) works on this node, as `ergond check` reports.

use crate::config::Config;
use crate::inventory::{describe_config_error, load_config};
use crate::metrics::server::{serve, Limits, SnapshotSource};
use crate::sampler::{Sampler, SamplerSources};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// Exit status after a clean stop.
pub const EXIT_OK: u8 = 0;
/// Exit status: invalid configuration, or the service could not start.
pub const EXIT_START: u8 = 1;
/// Exit status: no energy source works on this node.
pub const EXIT_NO_SOURCE: u8 = 2;

/// Log to stderr; `RUST_LOG` filters (default `info`). Colours only on a terminal (not in the
/// journal or a log file).
fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second initialisation (tests calling `run` twice) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .try_init();
}

/// Run the service until SIGTERM/SIGINT; returns the exit status.
pub fn run(explicit_config: Option<&Path>) -> u8 {
    init_logging();
    let (config, report) = match load_config(explicit_config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{}", describe_config_error(&e, explicit_config));
            return EXIT_START;
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %report.path,
        from_file = report.from_file,
        "ergond starting"
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the I/O runtime");
            return EXIT_START;
        }
    };
    runtime.block_on(service(config, &report.path))
}

async fn service(config: Config, config_path: &str) -> u8 {
    // Signal handlers first, so a stop request during start-up is not lost.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers");
            return EXIT_START;
        }
    };

    // Listen before the (slower) sources are opened: a port already in use fails at once.
    let addr: SocketAddr = config
        .metrics_listen
        .parse()
        .expect("Config::validate checked metrics_listen");
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                "cannot listen on {addr} for /metrics: {e}; set `metrics_listen` in {config_path} \
                 to a free address:port (another ergond may be running)"
            );
            return EXIT_START;
        }
    };

    let (sources, problems) = SamplerSources::open(&config);
    let gpus = sources.gpu.as_ref().map_or(0, |g| g.len());
    let zones = sources.rapl.as_ref().map_or(0, |r| r.zones().len());
    if gpus == 0 && zones == 0 {
        tracing::error!(
            problems = ?problems.iter().map(|p| format!("{}: {}", p.source, p.error)).collect::<Vec<_>>(),
            "no energy source works on this node (no GPU, no RAPL); `ergond check` says why"
        );
        return EXIT_NO_SOURCE;
    }
    // Detecting the GPU counter period blocks for up to a second: keep it off the I/O thread.
    let sampler = match tokio::task::spawn_blocking(move || Sampler::start(&config, sources)).await
    {
        Ok(Ok(s)) => Arc::new(s),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot start the sampler");
            return EXIT_START;
        }
        Err(e) => {
            tracing::error!(error = %e, "the sampler's start-up panicked");
            return EXIT_START;
        }
    };
    tracing::info!(gpus, rapl_zones = zones, options = ?sampler.options(), "sampling");
    tracing::info!(
        "job tracking is not implemented yet: the SPANK plugin's socket is not served and no \
         energy is attributed to jobs"
    );
    tracing::info!("serving Prometheus metrics on http://{addr}/metrics");

    let source: SnapshotSource = {
        let sampler = Arc::clone(&sampler);
        Arc::new(move || sampler.snapshot())
    };
    serve(listener, source, Limits::default(), async {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stopping");
    })
    .await;

    // The server has dropped its reference: this is the last one.
    match Arc::try_unwrap(sampler) {
        Ok(s) => drop(s.stop()),
        // Not expected; dropping the handle stops the threads all the same.
        Err(s) => drop(s),
    }
    tracing::info!("ergond stopped");
    EXIT_OK
}
