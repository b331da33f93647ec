//! The accept loop both of ergond's servers run, the plugin's Unix socket
//! ([`crate::server`]) and `/metrics` ([`crate::metrics::server`]): accept until shutdown, serve
//! each connection on a task of its own, survive accept errors, and at shutdown stop accepting
//! and give the connections being served a grace period.
//!
//! What to do with a connection is the server's: the socket server admits it under its own
//! policy (per-peer limits, evicting the longest-idle connection), `/metrics` only caps how many
//! are served at once ([`AcceptLoop::max_connections`]: further clients wait in the kernel's
//! accept queue).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// A listening socket.
pub trait Listener {
    /// An accepted connection.
    type Stream;
    /// Accept the next connection.
    fn accept_stream(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// How a server's accept loop behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptLoop {
    /// The server's name in the log (`accept failed`).
    pub name: &'static str,
    /// Wait after a failed accept (out of descriptors and the like), rather than spin.
    pub backoff: Duration,
    /// At shutdown, how long connections still being served may take.
    pub grace: Duration,
    /// Connections served at once, waited for before accepting (`None`: the server decides
    /// per connection).
    pub max_connections: Option<usize>,
}

impl AcceptLoop {
    /// Accept on `listener` until `shutdown` completes, running the future `serve` makes of
    /// each connection (`None`: the connection is dropped) on a task of its own; then stop
    /// accepting (the listener is closed), wait at most [`Self::grace`] for those tasks, and
    /// abort what is left.
    pub async fn run<L, F>(
        self,
        listener: L,
        shutdown: impl Future<Output = ()>,
        mut serve: impl FnMut(L::Stream) -> Option<F>,
    ) where
        L: Listener,
        F: Future<Output = ()> + Send + 'static,
    {
        let slots = self
            .max_connections
            .map(|n| Arc::new(Semaphore::new(n.max(1))));
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let slot = match &slots {
                Some(s) => tokio::select! {
                    p = Arc::clone(s).acquire_owned() => Some(p.expect("the semaphore is never closed")),
                    () = &mut shutdown => break,
                },
                None => None,
            };
            let accepted = tokio::select! {
                a = listener.accept_stream() => a,
                () = &mut shutdown => break,
            };
            // Reap finished connections so the set stays as small as the number in flight.
            while tasks.try_join_next().is_some() {}
            match accepted {
                Ok(stream) => {
                    if let Some(connection) = serve(stream) {
                        tasks.spawn(async move {
                            connection.await;
                            drop(slot);
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(server = self.name, error = %e, "accept failed");
                    tokio::time::sleep(self.backoff).await;
                }
            }
        }
        drop(listener);
        let _ = tokio::time::timeout(self.grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.shutdown().await;
    }
}
