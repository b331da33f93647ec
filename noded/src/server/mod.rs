//! The Unix socket server the SPANK plugin (and users' tools) talk to, in the shape of
//! mini-redis: [`listener`] binds the socket and accepts connections under a cap, [`connection`]
//! reads framed requests and writes replies on one connection, and the requests themselves are
//! answered by a [`Handler`] ([`crate::jobs::tracker::JobTracker::handle`] in the service).
//!
//! Every peer is identified by `SO_PEERCRED` (the kernel's word, not the client's); the handler
//! decides per request what that uid may do. Everything a client can make the server hold is
//! bounded: the frame size ([`ergon_protocol::MAX_FRAME_LEN`]), the time a connection may stay
//! silent ([`ServerLimits::first_frame_timeout`], [`ServerLimits::read_timeout`]), the
//! connections open at once ([`ServerLimits::max_connections`]; at the cap the longest-idle
//! connection is closed to make room, see [`listener`]) and per uid
//! ([`ServerLimits::max_per_peer`]). Floods (bad frames, refused connections) are logged once
//! per [`slots::LOG_EVERY`] with a count, and counted in [`ServerStats`] for `/metrics`.

pub mod connection;
pub mod listener;
pub mod slots;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ergon_protocol::{Reply, Request};

pub use listener::{bind, serve};
pub use slots::LogLimit;

/// Answers one request from a peer with the given uid.
pub type Handler = Arc<dyn Fn(Request, u32) -> Reply + Send + Sync>;

/// Bounds on what clients can make the server hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections open at once. At the cap, the connection idle longest (no complete frame
    /// since its accept or its last reply) is closed to make room; only when every one is busy
    /// with a request is a newcomer answered `Busy`.
    pub max_connections: usize,
    /// Connections one uid may hold, except root and [`ServerLimits::trusted_uid`].
    pub max_per_peer: usize,
    /// SlurmUser's uid, exempt from `max_per_peer` like root.
    pub trusted_uid: Option<u32>,
    /// How long a new connection may take to send its first frame (the plugin sends it right
    /// after connecting).
    pub first_frame_timeout: Duration,
    /// How long a connection may take to send a later request, and to take a reply.
    pub read_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_per_peer: 16,
            trusted_uid: None,
            first_frame_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(5),
        }
    }
}

/// What the socket server has seen, for `/metrics` (counters since start).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Idle connections closed to make room for a new one.
    pub evicted: AtomicU64,
    /// Connections refused (per-uid limit, or every slot busy).
    pub refused: AtomicU64,
    /// Frames that could not be decoded.
    pub malformed: AtomicU64,
    /// Connections closed for staying silent past their deadline.
    pub timed_out: AtomicU64,
    log_malformed: LogLimit,
    log_refused: LogLimit,
    log_evicted: LogLimit,
}

impl ServerStats {
    /// The counters now.
    pub fn snapshot(&self) -> crate::snapshot::SocketServerSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::snapshot::SocketServerSnapshot {
            accepted: r(&self.accepted),
            evicted: r(&self.evicted),
            refused: r(&self.refused),
            malformed: r(&self.malformed),
            timed_out: r(&self.timed_out),
        }
    }

    fn log_refused(&self, uid: u32, why: &str) {
        if let Some(n) = self.log_refused.hit() {
            tracing::warn!(uid, refused = n, "{why}");
        }
    }

    fn log_evicted(&self, max: usize) {
        if let Some(n) = self.log_evicted.hit() {
            tracing::warn!(
                max_connections = max,
                evicted = n,
                "the ergond socket is at its connection cap: idle connections were closed to \
                 make room (a client holding connections open without sending?)"
            );
        }
    }

    fn log_malformed(&self, uid: u32, pid: Option<i32>, error: &dyn std::fmt::Display) {
        if let Some(n) = self.log_malformed.hit() {
            tracing::warn!(uid, pid, error = %error, malformed = n, "malformed request on the ergond socket");
        }
    }
}
