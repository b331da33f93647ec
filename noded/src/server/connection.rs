//! One client connection: read a request, answer it, repeat until the client closes, stays
//! silent past the timeout, or sends something that is not a request.

use ergon_protocol::{read_frame_async, write_frame_async, ErrorCode, FrameError, Reply, Request};
use tokio::net::UnixStream;

use super::{Handler, ServerLimits};

/// Serve one connection to its end. Malformed input gets an error reply (when the socket still
/// takes one) and one warning in the log, then the connection is closed: after a bad frame the
/// stream cannot be trusted to be in step.
pub async fn run(mut stream: UnixStream, handler: Handler, limits: ServerLimits) {
    let (uid, pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.pid()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot identify a socket client (SO_PEERCRED); closing");
            return;
        }
    };
    loop {
        let read = tokio::time::timeout(
            limits.read_timeout,
            read_frame_async::<_, Request>(&mut stream),
        )
        .await;
        let request = match read {
            Err(_) => {
                tracing::debug!(uid, "socket client silent past the timeout; closing");
                return;
            }
            Ok(Ok(r)) => r,
            Ok(Err(FrameError::Closed)) => return,
            Ok(Err(e)) => {
                tracing::warn!(uid, pid, error = %e, "malformed request on the ergond socket");
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
        let reply = handler(request, uid);
        match tokio::time::timeout(limits.read_timeout, write_frame_async(&mut stream, &reply))
            .await
        {
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
