//! Binding the socket file and accepting connections.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use ergon_protocol::{write_frame_async, ErrorCode, Reply};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{connection, Handler, ServerLimits};

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
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        // Reap finished connections so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accept on the ergond socket failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                let handler = Arc::clone(&handler);
                tasks.spawn(async move {
                    connection::run(stream, handler, limits).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tracing::warn!(
                    max = limits.max_connections,
                    "too many connections on the ergond socket; refusing one"
                );
                let mut stream = stream;
                tasks.spawn(async move {
                    let reply = Reply::error(
                        ErrorCode::Busy,
                        "ergond is serving its maximum number of connections; retry shortly",
                    );
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        write_frame_async(&mut stream, &reply),
                    )
                    .await;
                });
            }
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(limits.read_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}
