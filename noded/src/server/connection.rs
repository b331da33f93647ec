//! One client connection: read a request, answer it, repeat until the client closes, stays
//! silent past its deadline, sends something that is not a request, or is evicted to make room
//! for another connection (see [`super::listener`]).

use std::sync::atomic::Ordering;

use ergon_protocol::{read_frame_async, write_frame_async, ErrorCode, FrameError, Reply, Request};
use tokio::net::UnixStream;

use super::slots::Slot;
use super::{Handler, ServerLimits, ServerStats};

/// Serve one connection from `uid` to its end. Malformed input gets an error reply (when the
/// socket still takes one) and is counted (and logged, rate-limited), then the connection is
/// closed: after a bad frame the stream cannot be trusted to be in step.
pub async fn run(
    mut stream: UnixStream,
    uid: u32,
    pid: Option<i32>,
    handler: Handler,
    limits: ServerLimits,
    slot: &Slot,
    stats: &ServerStats,
) {
    let mut deadline = limits.first_frame_timeout;
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout(deadline, read_frame_async::<_, Request>(&mut stream)) => r,
            () = slot.evicted() => {
                tracing::debug!(uid, "idle socket client closed to make room");
                return;
            }
        };
        deadline = limits.read_timeout;
        let request = match read {
            Err(_) => {
                stats.timed_out.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(uid, "socket client silent past the timeout; closing");
                return;
            }
            Ok(Ok(r)) => r,
            Ok(Err(FrameError::Closed)) => return,
            Ok(Err(e)) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                stats.log_malformed(uid, pid, &e);
                let code = match e {
                    FrameError::UnknownVersion { .. } => ErrorCode::UnsupportedVersion,
                    _ => ErrorCode::Malformed,
                };
                if !matches!(e, FrameError::Io(_)) {
                    let reply = Reply::error(code, e.to_string());
                    let _ = tokio::time::timeout(
                        limits.read_timeout,
                        write_frame_async(&mut stream, &reply),
                    )
                    .await;
                }
                return;
            }
        };
        slot.busy();
        let reply = handler(request, uid);
        let written =
            tokio::time::timeout(limits.read_timeout, write_frame_async(&mut stream, &reply)).await;
        slot.idle();
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(uid, error = %e, "cannot send a reply; closing");
                return;
            }
            Err(_) => {
                tracing::debug!(uid, "client did not take its reply in time; closing");
                return;
            }
        }
    }
}
