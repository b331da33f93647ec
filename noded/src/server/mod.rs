//! The Unix socket server the SPANK plugin (and users' tools) talk to, in the shape of
//! mini-redis: [`listener`] binds the socket and accepts connections under a cap, [`connection`]
//! reads framed requests and writes replies on one connection, and the requests themselves are
//! answered by a [`Handler`] ([`crate::jobs::tracker::JobTracker::handle`] in the service).
//!
//! Every peer is identified by `SO_PEERCRED` (the kernel's word, not the client's); the handler
//! decides per request what that uid may do. Everything a client can make the server hold is
//! bounded: the frame size ([`ergon_protocol::MAX_FRAME_LEN`]), the time a connection may stay
//! silent ([`ServerLimits::read_timeout`]) and the number of connections served at once
//! ([`ServerLimits::max_connections`]; a client beyond it gets `Busy` and is closed).

pub mod connection;
pub mod listener;

use std::sync::Arc;
use std::time::Duration;

use ergon_protocol::{Reply, Request};

pub use listener::{bind, serve};

/// Answers one request from a peer with the given uid.
pub type Handler = Arc<dyn Fn(Request, u32) -> Reply + Send + Sync>;

/// Bounds on what clients can make the server hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once; one more is answered `Busy` and closed.
    pub max_connections: usize,
    /// How long a connection may take to send a (next) request, and to take a reply.
    pub read_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            read_timeout: Duration::from_secs(5),
        }
    }
}
