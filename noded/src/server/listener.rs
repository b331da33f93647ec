//! Binding the socket file and accepting connections.
//!
//! Connections are served under a cap ([`ServerLimits::max_connections`]), but an idle
//! connection never keeps a lifecycle event out: when the cap is reached, the connection that
//! has waited longest without sending a complete frame is closed to make room (see
//! [`super::slots::Connections::admit`]). A connection is idle from its accept (or its last reply) until a
//! whole frame has arrived, and may stay so at most [`ServerLimits::first_frame_timeout`]
//! before its first frame and [`ServerLimits::read_timeout`] between frames. One uid other
//! than root and SlurmUser may hold at most [`ServerLimits::max_per_peer`] connections. So a
//! process holding hundreds of idle connections, or reopening them as fast as they close,
//! costs the plugin nothing: its event (sent right after connecting) always finds room.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ergon_protocol::{write_frame_async, ErrorCode, Reply};
use tokio::net::{UnixListener, UnixStream};

use crate::accept::AcceptLoop;

use super::slots::{lock, Connections, Refused, Slot};
use super::{connection, Handler, ServerLimits, ServerStats};

/// Bind `path` with permission bits `mode` and group `gid` (if given). Creates the parent
/// directory if needed. A stale socket file left by a previous run is replaced; a socket some
/// process still answers on is an [`io::ErrorKind::AddrInUse`] error, and a path that is not a
/// socket is left alone and refused.
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "a process is serving this socket (another ergond?)",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; remove it or set another socket_path",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(listener)
}

/// Accept connections until `shutdown` completes, serving each with `handler` under `limits`;
/// then stop accepting and wait (at most the read timeout) for open connections to finish.
pub async fn serve(
    listener: UnixListener,
    handler: Handler,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    shutdown: impl Future<Output = ()>,
) {
    let conns = Arc::new(Mutex::new(Connections::default()));
    let accept = AcceptLoop {
        name: "ergond socket",
        backoff: Duration::from_millis(10),
        grace: limits.read_timeout,
        // Admission is per connection, below: an idle one may be evicted to make room.
        max_connections: None,
    };
    accept
        .run(listener, shutdown, |stream| {
            admit(stream, &handler, limits, &stats, &conns)
        })
        .await;
}

/// Admit one connection under `limits` (evicting the longest-idle one if the server is full),
/// or refuse it with a `Busy` reply; the future that serves it either way, `None` when the
/// peer cannot be identified.
fn admit(
    stream: UnixStream,
    handler: &Handler,
    limits: ServerLimits,
    stats: &Arc<ServerStats>,
    conns: &Arc<Mutex<Connections>>,
) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    let (uid, pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.pid()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot identify a socket client (SO_PEERCRED); closing");
            return None;
        }
    };
    let admitted = lock(conns).admit(uid, &limits, Instant::now());
    match admitted {
        Ok((id, close, evicted)) => {
            if evicted {
                stats.evicted.fetch_add(1, Ordering::Relaxed);
                stats.log_evicted(limits.max_connections);
            }
            let slot = Slot::new(id, Arc::clone(conns), close);
            let handler = Arc::clone(handler);
            let stats = Arc::clone(stats);
            Some(Box::pin(async move {
                connection::run(stream, uid, pid, handler, limits, &slot, &stats).await;
                drop(slot);
            }))
        }
        Err(why) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            let text = match why {
                Refused::PerPeer(n) => format!(
                    "uid {uid} already holds {n} connections to ergond, its limit; close \
                     some and retry"
                ),
                Refused::Full(n) => {
                    format!("ergond is answering {n} requests at once, its maximum; retry shortly")
                }
            };
            stats.log_refused(uid, &text);
            let mut stream = stream;
            Some(Box::pin(async move {
                let reply = Reply::error(ErrorCode::Busy, text);
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    write_frame_async(&mut stream, &reply),
                )
                .await;
            }))
        }
    }
}
