//! systemd integration of the node service (`ergond` without a subcommand), through the
//! `sd-notify` and `tracing-journald` crates.
//!
//! - **Readiness** (`Type=notify`): [`ready`] sends `READY=1` once the Prometheus listener and
//!   the plugin's socket are bound and the sampler and the job tracker run, so that units
//!   ordered after ergond (`Before=slurmd.service` in `packaging/ergond.service`) start only
//!   then.
//! - **`STATUS=`** lines ([`status`], [`ready`], [`stopping`]) say what ergond is doing;
//!   `systemctl status ergond` shows the latest.
//! - **Watchdog** (`WatchdogSec=`): [`watchdog`] sends `WATCHDOG=1` every half of
//!   `WATCHDOG_USEC`, but only while every sampler source keeps ticking ([`TickWatch`]). A
//!   stalled sampler (a hung NVML call, a dead thread) or a blocked I/O thread stops the pings,
//!   and systemd kills and (`Restart=on-failure`) restarts the service.
//! - **`STOPPING=1`** when a stop signal arrives ([`stopping`]).
//! - **Logging** ([`init_logging`]): to the journal's native protocol through
//!   `tracing-journald` when stderr is the journal (`JOURNAL_STREAM` names stderr's device and
//!   inode, as systemd sets it for `StandardError=journal`) or `--log journal` asks; otherwise
//!   to stderr as before. In the journal each event's message is `MESSAGE` and its fields are
//!   journal fields prefixed `F_` (`journalctl -u ergond -o verbose` shows them); levels map
//!   to priorities (error 3, warn 4, info 6, debug and trace 7).
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every notification is a no-op.

use crate::metrics::server::SnapshotSource;
use crate::snapshot::SamplerHealth;
use std::future::Future;
use std::time::Duration;

/// Where [`init_logging`] sends the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogTarget {
    /// The journal when stderr is connected to it (JOURNAL_STREAM), else stderr.
    #[default]
    Auto,
    /// The journal's native protocol (falls back to stderr, with a warning, when journald
    /// cannot be reached).
    Journal,
    /// stderr, one line per event (colours only on a terminal).
    Stderr,
}

/// Install the global `tracing` subscriber: level from `RUST_LOG` (default `info`), output as
/// `target` says. A second call (tests running the service twice) keeps the first subscriber.
pub fn init_logging(target: LogTarget) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let journal = match target {
        LogTarget::Auto => stderr_is_journal(),
        LogTarget::Journal => true,
        LogTarget::Stderr => false,
    };
    if !journal {
        init_stderr();
        return;
    }
    match tracing_journald::layer() {
        Ok(layer) => {
            use tracing_journald::{Priority, PriorityMappings};
            let layer = layer.with_priority_mappings(PriorityMappings {
                info: Priority::Informational,
                debug: Priority::Debug,
                trace: Priority::Debug,
                ..PriorityMappings::new()
            });
            let _ = tracing_subscriber::registry()
                .with(env_filter())
                .with(layer)
                .try_init();
        }
        Err(e) => {
            init_stderr();
            tracing::warn!(error = %e, "cannot log to the journal; logging to stderr");
        }
    }
}

fn env_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// Log to stderr; colours only on a terminal (not in the journal or a log file).
fn init_stderr() {
    use std::io::IsTerminal as _;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(env_filter())
        .try_init();
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` holds
/// `<device>:<inode>` of that stream (decimal), and a redirected stderr no longer matches it.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(meta) => value
            .to_str()
            .is_some_and(|v| journal_stream_matches(v, &meta)),
        Err(_) => false,
    }
}

/// Whether a `JOURNAL_STREAM` value (`<device>:<inode>`) names the file `meta` describes.
fn journal_stream_matches(value: &str, meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some((dev, ino)) = value.trim().split_once(':') else {
        return false;
    };
    matches!(
        (dev.parse::<u64>(), ino.parse::<u64>()),
        (Ok(d), Ok(i)) if d == meta.dev() && i == meta.ino()
    )
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// `STATUS=<line>`.
pub fn status(line: &str) {
    notify(&[sd_notify::NotifyState::Status(line)]);
}

/// `READY=1` with `STATUS=<line>`: the service is up.
pub fn ready(line: &str) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(line),
    ]);
}

/// `STOPPING=1`: shutdown has begun (manifests of ended jobs are written before the exit).
pub fn stopping() {
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: writing the manifests of ended jobs"),
    ]);
}

/// Ping the systemd watchdog every half of `WATCHDOG_USEC` while the sampler's ticks advance,
/// until `stopped` completes. Returns at once when the unit has no `WatchdogSec=`.
///
/// `running` is the `STATUS=` line restored when a stalled sampler recovers.
pub async fn watchdog(
    snapshot: SnapshotSource,
    running: String,
    stopped: impl Future<Output = ()>,
) {
    let Some(timeout) = sd_notify::watchdog_enabled().filter(|t| !t.is_zero()) else {
        return;
    };
    tracing::info!(
        timeout_s = timeout.as_secs_f64(),
        "systemd watchdog enabled: pinging every {:.1} s while the sampler ticks",
        timeout.as_secs_f64() / 2.0
    );
    let mut watch = TickWatch::new(timeout);
    let mut ticks = tokio::time::interval(timeout / 2);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stopped);
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = ticks.tick() => {}
        }
        let snap = snapshot();
        match watch.observe(snap.taken_monotonic_ns, &snap.samplers) {
            Ok(()) => {
                if stalled {
                    tracing::warn!("the sampler ticks again: systemd watchdog pings resumed");
                    status(&running);
                    stalled = false;
                }
                notify(&[sd_notify::NotifyState::Watchdog]);
            }
            Err(stall) => {
                if !stalled {
                    tracing::error!(
                        "{stall}: no longer pinging the systemd watchdog, which will restart ergond"
                    );
                    status(&stall);
                    stalled = true;
                }
            }
        }
    }
}

/// Decides whether the sampler is healthy from successive [`SamplerHealth`] lists: every
/// source's `samples` count must have advanced within the last `max(watchdog timeout,
/// 3 × its period)`.
#[derive(Debug)]
pub struct TickWatch {
    timeout_ns: u64,
    /// Per source: the last `samples` count seen and when it last changed (monotonic ns).
    last: Vec<(&'static str, u64, u64)>,
}

impl TickWatch {
    /// A watch for a watchdog timeout of `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout_ns: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
            last: Vec::new(),
        }
    }

    /// Record the sources' counts as of `now_ns` (monotonic); `Err` names each source whose
    /// ticks have stopped. A source seen for the first time counts as having just ticked.
    pub fn observe(&mut self, now_ns: u64, samplers: &[SamplerHealth]) -> Result<(), String> {
        let mut stalled = Vec::new();
        for h in samplers {
            let Some(entry) = self.last.iter_mut().find(|(s, ..)| *s == h.source) else {
                self.last.push((h.source, h.samples, now_ns));
                continue;
            };
            if entry.1 != h.samples {
                *entry = (h.source, h.samples, now_ns);
                continue;
            }
            let quiet_ns = now_ns.saturating_sub(entry.2);
            if quiet_ns > self.timeout_ns.max(h.period_ns.saturating_mul(3)) {
                stalled.push(format!(
                    "{} ({:.1} s without a tick, period {} ms)",
                    h.source,
                    quiet_ns as f64 / 1e9,
                    h.period_ns / 1_000_000
                ));
            }
        }
        if stalled.is_empty() {
            Ok(())
        } else {
            Err(format!("sampler stalled: {}", stalled.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(source: &'static str, period_ms: u64, samples: u64) -> SamplerHealth {
        SamplerHealth {
            source,
            period_ns: period_ms * 1_000_000,
            samples,
            missed_ticks: 0,
            read_errors: 0,
            read_latency_p50_ns: 0,
            read_latency_p99_ns: 0,
            max_lateness_ns: 0,
            lateness_p50_ns: 0,
            lateness_p99_ns: 0,
            lateness_sum_ns: 0,
            read_latency_sum_ns: 0,
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn advancing_sources_are_healthy_and_a_stopped_one_is_named() {
        let mut w = TickWatch::new(Duration::from_secs(30));
        assert!(w
            .observe(0, &[health("gpu", 50, 0), health("rapl", 100, 0)])
            .is_ok());
        assert!(w
            .observe(15 * S, &[health("gpu", 50, 300), health("rapl", 100, 150)])
            .is_ok());
        // rapl stops; within the timeout that is not yet a stall.
        assert!(w
            .observe(30 * S, &[health("gpu", 50, 600), health("rapl", 100, 150)])
            .is_ok());
        assert!(w
            .observe(45 * S, &[health("gpu", 50, 900), health("rapl", 100, 150)])
            .is_ok());
        let e = w
            .observe(46 * S, &[health("gpu", 50, 920), health("rapl", 100, 150)])
            .unwrap_err();
        assert!(e.contains("rapl") && !e.contains("gpu"), "{e}");
        // It ticks again: healthy at once.
        assert!(w
            .observe(47 * S, &[health("gpu", 50, 940), health("rapl", 100, 151)])
            .is_ok());
    }

    #[test]
    fn a_period_longer_than_the_timeout_gets_three_periods() {
        let mut w = TickWatch::new(Duration::from_secs(30));
        assert!(w.observe(0, &[health("rapl", 60_000, 1)]).is_ok());
        assert!(w.observe(100 * S, &[health("rapl", 60_000, 1)]).is_ok());
        assert!(w.observe(181 * S, &[health("rapl", 60_000, 1)]).is_err());
    }

    #[test]
    fn journal_stream_names_device_and_inode() {
        use std::os::unix::fs::MetadataExt as _;
        let f = tempfile::tempfile().unwrap();
        let meta = f.metadata().unwrap();
        let value = format!("{}:{}", meta.dev(), meta.ino());
        assert!(journal_stream_matches(&value, &meta));
        assert!(!journal_stream_matches(
            &format!("{}:{}", meta.dev(), meta.ino() + 1),
            &meta
        ));
        for bad in ["", "12", "a:b", ":", "1:2:3"] {
            assert!(!journal_stream_matches(bad, &meta), "{bad}");
        }
    }
}
