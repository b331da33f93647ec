//! A one-shot, blocking client for ergond's socket, with one deadline for the whole exchange.
//!
//! The plugin runs inside slurmd and slurmstepd: it must not start threads or a runtime, and a
//! missing, refusing, slow or hung daemon may delay a job by at most the configured timeout. So
//! the connect is non-blocking and polled, and every read and write gets the time that is left
//! before the deadline, not a fresh timeout each.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ergon_protocol::{read_frame, write_frame, ErrorCode, FrameError, Reply, Request};

/// Why an event did not reach ergond. The `Display` text is what the slurmd log shows.
#[derive(Debug)]
pub enum SendError {
    /// No daemon listens on the socket (absent, wrong path, stopped).
    Connect(io::Error),
    /// The daemon's accept queue is full.
    Busy,
    /// The deadline passed (hung or slow daemon).
    Timeout(Duration),
    /// The exchange broke (reset, garbage reply).
    Frame(FrameError),
    /// The daemon answered with an error.
    Refused(ErrorCode, String),
    /// The daemon answered something that is not a reply to this request.
    Unexpected(Reply),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "cannot connect ({e}); is ergond running?"),
            SendError::Busy => write!(f, "ergond's connection queue is full"),
            SendError::Timeout(t) => write!(
                f,
                "no reply within {} ms (ergond hung or overloaded?)",
                t.as_millis()
            ),
            SendError::Frame(e) => write!(f, "exchange failed: {e}"),
            SendError::Refused(code, reason) => write!(f, "ergond refused it ({code:?}): {reason}"),
            SendError::Unexpected(r) => write!(f, "unexpected reply {r:?}"),
        }
    }
}

impl std::error::Error for SendError {}

/// Sends one request and waits for its reply, all within `timeout`.
pub fn send(socket: &Path, timeout: Duration, request: &Request) -> Result<Reply, SendError> {
    send_waiting(socket, timeout, timeout, request)
}

/// Sends one request within `timeout` (connect and write) and waits for the reply at most
/// `reply_wait` of what is left; a reply that does not come in time is a
/// [`SendError::Timeout`] of `reply_wait` (ergond may still record the request: it handles a
/// request whose sender has gone and only fails to answer it).
pub fn send_waiting(
    socket: &Path,
    timeout: Duration,
    reply_wait: Duration,
    request: &Request,
) -> Result<Reply, SendError> {
    let deadline = Instant::now() + timeout;
    let stream = connect(socket, deadline, timeout)?;
    let mut stream = DeadlineStream { stream, deadline };
    let waited = if reply_wait < timeout {
        reply_wait
    } else {
        timeout
    };
    let result = write_frame(&mut stream, request).and_then(|()| {
        stream.deadline = stream.deadline.min(Instant::now() + reply_wait);
        read_frame::<_, Reply>(&mut stream)
    });
    match result {
        Ok(Reply::Error { code, reason }) => Err(SendError::Refused(code, reason)),
        Ok(reply) => Ok(reply),
        Err(e) if e.is_timeout() => Err(SendError::Timeout(waited)),
        Err(e) => Err(SendError::Frame(e)),
    }
}

/// Sends one lifecycle event; `Ok` only when ergond acknowledged it.
pub fn notify(socket: &Path, timeout: Duration, request: &Request) -> Result<(), SendError> {
    notify_waiting(socket, timeout, timeout, request)
}

/// As [`notify`], waiting for the acknowledgement at most `reply_wait` ([`send_waiting`]).
pub fn notify_waiting(
    socket: &Path,
    timeout: Duration,
    reply_wait: Duration,
    request: &Request,
) -> Result<(), SendError> {
    match send_waiting(socket, timeout, reply_wait, request)? {
        Reply::Ok => Ok(()),
        other => Err(SendError::Unexpected(other)),
    }
}

fn connect(path: &Path, deadline: Instant, timeout: Duration) -> Result<UnixStream, SendError> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(SendError::Connect(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (addr, len) = sockaddr(path).map_err(SendError::Connect)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: addr is a valid sockaddr_un of length len.
    let rc = unsafe { libc::connect(raw, &addr as *const _ as *const libc::sockaddr, len) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // A Unix socket whose backlog is full answers EAGAIN at once.
            Some(libc::EAGAIN) => return Err(SendError::Busy),
            Some(libc::EINPROGRESS) => match wait_ready(raw, libc::POLLOUT, deadline) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(SendError::Timeout(timeout))
                }
                Err(e) => return Err(SendError::Connect(e)),
            },
            _ => return Err(SendError::Connect(err)),
        }
    }
    // The socket stays non-blocking: every read and write waits in `wait_ready` first.
    Ok(UnixStream::from(fd))
}

/// Waits until `fd` is ready for `events` or the deadline passes (`TimedOut`).
///
/// `ppoll` with the exact time left: socket timeouts (`SO_RCVTIMEO`) are rounded up to scheduler
/// ticks and were measured 4–8 ms late here, which would break the "timeout + 5 ms" bound.
fn wait_ready(fd: i32, events: libc::c_short, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        let ts = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd and timespec; the signal mask is left alone.
        let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is too long or contains a NUL byte",
                path.display()
            ),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// A non-blocking stream whose every read and write may only use the time left before one
/// deadline.
struct DeadlineStream {
    stream: UnixStream,
    deadline: Instant,
}

impl DeadlineStream {
    fn retry<T>(
        &mut self,
        events: libc::c_short,
        mut op: impl FnMut(&mut UnixStream) -> io::Result<T>,
    ) -> io::Result<T> {
        use std::os::fd::AsRawFd;
        loop {
            match op(&mut self.stream) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_ready(self.stream.as_raw_fd(), events, self.deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(libc::POLLIN, |s| s.read(buf))
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(libc::POLLOUT, |s| s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn tmp_socket(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("spank-ergon-client-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("s.sock")
    }

    #[test]
    fn no_listener_fails_fast_with_connect_error() {
        let path = tmp_socket("none");
        let t = Instant::now();
        let err = notify(&path, Duration::from_millis(100), &Request::Ping).unwrap_err();
        assert!(matches!(err, SendError::Connect(_)), "{err}");
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn a_short_reply_wait_bounds_a_hung_listener_and_still_hears_an_answer() {
        // Never answers: the wait ends after reply_wait, not the whole timeout.
        let path = tmp_socket("hung-short");
        let _listener = UnixListener::bind(&path).unwrap();
        let t = Instant::now();
        let err = notify_waiting(
            &path,
            Duration::from_millis(500),
            Duration::from_millis(10),
            &Request::Ping,
        )
        .unwrap_err();
        let took = t.elapsed();
        assert!(
            matches!(err, SendError::Timeout(d) if d == Duration::from_millis(10)),
            "{err}"
        );
        assert!(took >= Duration::from_millis(10), "{took:?}");
        assert!(took < Duration::from_millis(10 + 50), "{took:?}");
        assert!(err.to_string().contains("no reply within 10 ms"), "{err}");

        // Answers at once: heard within the short wait, a refusal included.
        let path = tmp_socket("refuse-short");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _: Request = read_frame(&mut s).unwrap();
            write_frame(
                &mut s,
                &Reply::error(ergon_protocol::ErrorCode::PermissionDenied, "not root"),
            )
            .unwrap();
        });
        let err = notify_waiting(
            &path,
            Duration::from_millis(500),
            Duration::from_millis(10),
            &Request::Ping,
        )
        .unwrap_err();
        assert!(matches!(err, SendError::Refused(..)), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn hung_listener_is_bounded_by_the_deadline() {
        let path = tmp_socket("hung");
        let _listener = UnixListener::bind(&path).unwrap(); // never accepts, never answers
        let t = Instant::now();
        let err = notify(&path, Duration::from_millis(80), &Request::Ping).unwrap_err();
        let took = t.elapsed();
        assert!(matches!(err, SendError::Timeout(_)), "{err}");
        assert!(took >= Duration::from_millis(80), "{took:?}");
        assert!(took < Duration::from_millis(80 + 50), "{took:?}");
    }

    #[test]
    fn listener_that_never_accepts_is_bounded_too() {
        let path = tmp_socket("backlog");
        // Bound but never accepting: the connection waits in the backlog, no reply ever comes.
        let _listener = UnixListener::bind(&path).unwrap();
        let t = Instant::now();
        let err = notify(&path, Duration::from_millis(50), &Request::Ping).unwrap_err();
        assert!(matches!(err, SendError::Timeout(_)), "{err}");
        assert!(
            t.elapsed() < Duration::from_millis(50 + 50),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn answering_listener_acknowledges_and_errors_are_reported() {
        let path = tmp_socket("ok");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for reply in [
                Reply::Ok,
                Reply::error(ErrorCode::PermissionDenied, "not root"),
            ] {
                let (mut s, _) = listener.accept().unwrap();
                let req: Request = read_frame(&mut s).unwrap();
                assert_eq!(req, Request::Ping);
                write_frame(&mut s, &reply).unwrap();
            }
        });
        notify(&path, Duration::from_secs(5), &Request::Ping).unwrap();
        let err = notify(&path, Duration::from_secs(5), &Request::Ping).unwrap_err();
        assert!(
            matches!(err, SendError::Refused(ErrorCode::PermissionDenied, ref r) if r == "not root"),
            "{err}"
        );
        server.join().unwrap();
    }

    #[test]
    fn garbage_reply_is_a_frame_error() {
        let path = tmp_socket("garbage");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(b"\x00\x00\x00\x04junk");
        });
        let err = notify(&path, Duration::from_secs(5), &Request::Ping).unwrap_err();
        assert!(matches!(err, SendError::Frame(_)), "{err}");
        server.join().unwrap();
    }
}
