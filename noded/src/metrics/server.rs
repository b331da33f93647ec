//! The HTTP server behind `/metrics`: `GET /metrics` renders the current snapshot, `GET /` says
//! where the metrics are, any other path is 404 and any other method 405.
//!
//! # Why no HTTP crate
//!
//! A Prometheus scraper sends one small `GET` per interval and needs nothing of HTTP beyond a
//! request line, a status and a `Content-Length`. This server reads one request head (bounded:
//! [`Limits::max_head_bytes`], [`Limits::timeout`]), answers it with `Connection: close`, and
//! closes; at most [`Limits::max_connections`] connections are served at once, the next ones wait
//! in the kernel's accept queue. That is about 200 lines on tokio, which ergond already uses,
//! against `hyper` + `hyper-util` + `http` + `httparse` and their features for a daemon that
//! should stay small and auditable on every compute node. Keep-alive, chunked bodies and
//! compression are deliberately absent: a scrape every few seconds on a fresh loopback
//! connection costs nothing, and a response of a few kilobytes needs no gzip. `HEAD` is
//! answered like `GET` without a body, as HTTP requires of a general-purpose server.
//!
//! The request → response step ([`respond`]) is a pure function, tested without sockets.

use super::{render, CONTENT_TYPE};
use crate::accept::AcceptLoop;
use crate::snapshot::NodeSnapshot;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Where the server gets the node's state: called once per `GET /metrics`. It must be cheap
/// (the sampler's published snapshot, cloned), as it runs on the server's thread.
pub type SnapshotSource = Arc<dyn Fn() -> NodeSnapshot + Send + Sync>;

/// Bounds on what one client can make the server hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line and headers) read; a larger one gets 431.
    pub max_head_bytes: usize,
    /// Time allowed to receive the request head, and again to send the response.
    pub timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 8 * 1024,
            timeout: Duration::from_secs(5),
            max_connections: 16,
        }
    }
}

/// How long connections still being answered get once shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A complete response, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// Extra headers (besides `Content-Length` and `Connection: close`).
    pub headers: Vec<(&'static str, String)>,
    /// Body (`Content-Length` is its length, also for `HEAD`).
    pub body: Vec<u8>,
    /// Send the headers only (`HEAD`).
    pub head_only: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Self {
            status,
            reason,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: body.as_bytes().to_vec(),
            head_only: false,
        }
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        for (k, v) in &self.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        ));
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

const INDEX: &str = "<!DOCTYPE html>\n<html><head><title>ergond</title></head><body>\n\
<h1>ergond</h1>\n<p>ergon node daemon: GPU and CPU energy of this node.</p>\n\
<p>Prometheus metrics: <a href=\"/metrics\">/metrics</a></p>\n</body></html>\n";

/// Answer one request head (everything up to and including the blank line).
pub fn respond(head: &[u8], snapshot: impl FnOnce() -> NodeSnapshot) -> Response {
    let Ok(head) = std::str::from_utf8(head) else {
        return Response::text(400, "Bad Request", "request head is not UTF-8\n");
    };
    let request_line = head.split('\n').next().unwrap_or("").trim_end_matches('\r');
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "Bad Request", "malformed request line\n");
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") || method.is_empty() || target.is_empty() {
        return Response::text(400, "Bad Request", "malformed request line\n");
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut r = Response::text(405, "Method Not Allowed", "only GET and HEAD\n");
            r.headers.push(("Allow", "GET, HEAD".into()));
            return r;
        }
    };
    let mut r = match path {
        "/metrics" => {
            let mut body = String::with_capacity(16 * 1024);
            render(&snapshot(), &mut body);
            Response {
                status: 200,
                reason: "OK",
                headers: vec![("Content-Type", CONTENT_TYPE.into())],
                body: body.into_bytes(),
                head_only: false,
            }
        }
        "/" => Response {
            status: 200,
            reason: "OK",
            headers: vec![("Content-Type", "text/html; charset=utf-8".into())],
            body: INDEX.as_bytes().to_vec(),
            head_only: false,
        },
        _ => Response::text(404, "Not Found", "not found; metrics are at /metrics\n"),
    };
    r.head_only = head_only;
    r
}

/// Where the request head ends in `buf` (index just past the blank line), if it does. Bare
/// `\n` line ends are accepted, as RFC 9112 allows.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Read one request head and answer it.
async fn handle(mut stream: TcpStream, snapshot: SnapshotSource, limits: Limits) {
    let mut buf = Vec::with_capacity(1024);
    let read = timeout(limits.timeout, async {
        let mut chunk = [0u8; 2048];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, io::Error>(None);
            }
            // Look for the end again from a little before the new bytes (a split "\r\n\r\n").
            let from = buf.len().saturating_sub(3);
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = head_end(&buf[from..]) {
                return Ok(Some(from + end));
            }
            if buf.len() > limits.max_head_bytes {
                return Ok(Some(usize::MAX));
            }
        }
    })
    .await;
    let response = match read {
        Ok(Ok(Some(end))) if end <= limits.max_head_bytes => respond(&buf[..end], || snapshot()),
        Ok(Ok(Some(_))) => Response::text(
            431,
            "Request Header Fields Too Large",
            "request head too large\n",
        ),
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => Response::text(
            408,
            "Request Timeout",
            "request head not received in time\n",
        ),
    };
    if response.status >= 400 {
        tracing::debug!(status = response.status, "metrics request refused");
    }
    let bytes = response.to_bytes();
    let _ = timeout(limits.timeout, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
}

/// Serve `/metrics` on `listener` until `shutdown` completes; then stop accepting, give
/// connections still being answered a moment, and return.
///
/// Errors accepting one connection (out of file descriptors, a connection reset before it was
/// accepted) are logged and the server goes on.
pub async fn serve(
    listener: TcpListener,
    snapshot: SnapshotSource,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let accept = AcceptLoop {
        name: "metrics",
        backoff: Duration::from_millis(100),
        grace: SHUTDOWN_GRACE,
        max_connections: Some(limits.max_connections),
    };
    accept
        .run(listener, shutdown, |stream| {
            Some(handle(stream, snapshot.clone(), limits))
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::SamplerHealth;

    fn snap() -> NodeSnapshot {
        NodeSnapshot {
            samplers: vec![SamplerHealth {
                source: "gpu",
                period_ns: 100_000_000,
                samples: 7,
                missed_ticks: 0,
                read_errors: 0,
                read_latency_p50_ns: 0,
                read_latency_p99_ns: 0,
                max_lateness_ns: 0,
                lateness_p50_ns: 0,
                lateness_p99_ns: 0,
                lateness_sum_ns: 0,
                read_latency_sum_ns: 0,
            }],
            ..NodeSnapshot::default()
        }
    }

    fn get(head: &str) -> Response {
        respond(head.as_bytes(), snap)
    }

    #[test]
    fn routes_methods_and_paths() {
        let r = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.status, 200);
        assert_eq!(r.headers[0].1, CONTENT_TYPE);
        let body = String::from_utf8(r.body.clone()).unwrap();
        assert!(body.contains("ergon_sampler_samples_total{source=\"gpu\"} 7"));
        let wire = String::from_utf8(r.to_bytes()).unwrap();
        assert!(wire.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(wire.contains(&format!("Content-Length: {}\r\n", r.body.len())));
        assert!(wire.contains("Connection: close\r\n\r\n# HELP"));

        assert_eq!(get("GET /metrics?x=1 HTTP/1.0\r\n\r\n").status, 200);
        let index = get("GET / HTTP/1.1\r\n\r\n");
        assert_eq!(index.status, 200);
        assert!(String::from_utf8(index.body).unwrap().contains("/metrics"));
        assert_eq!(get("GET /metric HTTP/1.1\r\n\r\n").status, 404);
        assert_eq!(get("GET /metrics/ HTTP/1.1\n\n").status, 404);

        let post = get("POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(post.status, 405);
        assert!(post.headers.contains(&("Allow", "GET, HEAD".into())));
        assert_eq!(get("DELETE / HTTP/1.1\r\n\r\n").status, 405);

        let head = get("HEAD /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(head.status, 200);
        let wire = head.to_bytes();
        assert!(wire.ends_with(b"\r\n\r\n"));
        assert!(String::from_utf8(wire)
            .unwrap()
            .contains(&format!("Content-Length: {}", head.body.len())));

        for bad in [
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/2\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 extra\r\n\r\n",
        ] {
            assert_eq!(get(bad).status, 400, "{bad:?}");
        }
        assert_eq!(respond(b"GET /\xff HTTP/1.1\r\n\r\n", snap).status, 400);
    }

    #[test]
    fn snapshot_is_taken_only_for_metrics() {
        let r = respond(b"GET / HTTP/1.1\r\n\r\n", || panic!("not needed"));
        assert_eq!(r.status, 200);
        let r = respond(b"PUT /metrics HTTP/1.1\r\n\r\n", || panic!("not needed"));
        assert_eq!(r.status, 405);
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    /// Raw exchange with a server started on a free port.
    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn serves_over_tcp_within_its_limits_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_head_bytes: 1024,
            timeout: Duration::from_millis(300),
            max_connections: 2,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(snap), limits, async {
            let _ = stopped.await;
        }));

        // A request split across writes, as a slow client sends it.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHo").await.unwrap();
        tokio::task::yield_now().await;
        s.write_all(b"st: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("ergon_build_info"), "{out}");

        let out = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 404 "), "{out}");
        let out = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 405 "), "{out}");

        // An oversized head is refused without reading it all.
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', 4096));
        let out = exchange(addr, &big).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");

        // Two silent clients take both slots; a third is served once they time out.
        let idle1 = TcpStream::connect(addr).await.unwrap();
        let idle2 = TcpStream::connect(addr).await.unwrap();
        let started = tokio::time::Instant::now();
        let out = exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(started.elapsed() >= Duration::from_millis(150));
        let mut idle1 = idle1;
        let mut timed_out = String::new();
        idle1.read_to_string(&mut timed_out).await.unwrap();
        assert!(timed_out.starts_with("HTTP/1.1 408 "), "{timed_out}");
        drop(idle2);

        stop.send(()).unwrap();
        timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
