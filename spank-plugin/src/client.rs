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
    let deadline = Instant::now() + timeout;
    let stream = connect(socket, deadline, timeout)?;
    let mut stream = DeadlineStream {
        stream,
        deadline,
        timeout,
    };
    let result =
        write_frame(&mut stream, request).and_then(|()| read_frame::<_, Reply>(&mut stream));
    match result {
        Ok(Reply::Error { code, reason }) => Err(SendError::Refused(code, reason)),
        Ok(reply) => Ok(reply),
        Err(e) if e.is_timeout() => Err(SendError::Timeout(timeout)),
        Err(e) => Err(SendError::Frame(e)),
    }
}

/// Sends one lifecycle event; `Ok` only when ergond acknowledged it.
pub fn notify(socket: &Path, timeout: Duration, request: &Request) -> Result<(), SendError> {
    match send(socket, timeout, request)? {
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
            Some(libc::EINPROGRESS) => {
                wait_writable(raw, deadline, timeout)?;
            }
            _ => return Err(SendError::Connect(err)),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false).map_err(SendError::Connect)?;
    Ok(stream)
}

fn wait_writable(fd: i32, deadline: Instant, timeout: Duration) -> Result<(), SendError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
    match n {
        0 => Err(SendError::Timeout(timeout)),
        n if n < 0 => Err(SendError::Connect(io::Error::last_os_error())),
        _ => Ok(()),
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

/// A stream whose every read and write may only use the time left before one deadline.
struct DeadlineStream {
    stream: UnixStream,
    deadline: Instant,
    timeout: Duration,
}

impl DeadlineStream {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("deadline of {} ms passed", self.timeout.as_millis()),
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
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
