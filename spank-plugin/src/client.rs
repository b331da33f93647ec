//! A one-shot, blocking client for ergond's socket, with one deadline for the whole exchange.
//!
//! The plugin runs inside slurmd and slurmstepd: it must not start threads or a runtime, and a
//! missing, refusing, slow or hung daemon may delay a job by at most the configured timeout. So
//! the connect is non-blocking and polled, and every read and write gets the time that is left
//! before the deadline, not a fresh timeout each.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ergon_protocol::{read_frame, write_frame, ErrorCode, FrameError, Reply, Request};
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::time::TimeSpec;

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
    use nix::errno::Errno;
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(path).map_err(|e| {
        SendError::Connect(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is too long or contains a NUL byte ({e})",
                path.display()
            ),
        ))
    })?;
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| SendError::Connect(e.into()))?;
        match nix::sys::socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => return Ok(UnixStream::from(fd)),
            Err(Errno::EINPROGRESS) => {
                return match wait_ready(&fd, PollFlags::POLLOUT, deadline) {
                    Ok(()) => Ok(UnixStream::from(fd)),
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        Err(SendError::Timeout(timeout))
                    }
                    Err(e) => Err(SendError::Connect(e)),
                };
            }
            // A Unix socket whose backlog is full answers EAGAIN at once: the daemon is
            // accepting as fast as it can (a burst, or a client flooding it), so try again
            // until the deadline rather than give up on the first refusal.
            Err(Errno::EAGAIN) => {
                if Instant::now() + CONNECT_RETRY >= deadline {
                    return Err(SendError::Busy);
                }
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(e) => return Err(SendError::Connect(e.into())),
        }
    }
}

/// Most events left in the queue directory; beyond, an event is dropped (and logged): a
/// daemon that has been down that long has lost more than these.
pub const QUEUE_MAX_FILES: usize = 10_000;
/// The suffix of a queued event (ergond replays only these).
pub const QUEUE_SUFFIX: &str = ".event";

/// Leave an event ergond could not take in the queue directory `dir`, for ergond to replay
/// when it can (at its next start, or within a second if it runs): one file per event, named by
/// the event's own time so that ergond replays them in order, written under a temporary name
/// and renamed (ergond never reads half an event), mode 0600, never through a symlink. `dir`
/// is created (mode 0700) if missing; one that is not a directory we own is refused. Bounded
/// by [`QUEUE_MAX_FILES`]. Returns the file written.
pub fn queue(dir: &Path, stamp_ns: u64, request: &Request) -> Result<std::path::PathBuf, String> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?
        }
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!(
            "{} is not a directory owned by this process's user",
            dir.display()
        ));
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .take(QUEUE_MAX_FILES + 1)
        .count();
    if entries > QUEUE_MAX_FILES {
        return Err(format!(
            "{} already holds {QUEUE_MAX_FILES} events (is ergond down for good?)",
            dir.display()
        ));
    }
    let frame = ergon_protocol::encode_frame(request).map_err(|e| e.to_string())?;
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    let name = format!("{stamp_ns:020}-{pid}-{seq}{QUEUE_SUFFIX}");
    let tmp = dir.join(format!(".tmp-{pid}-{seq}{QUEUE_SUFFIX}"));
    let path = dir.join(&name);
    let write = || -> io::Result<()> {
        let fd = nix::fcntl::open(
            &tmp,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        std::fs::File::from(fd).write_all(&frame)?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })?;
    Ok(path)
}

/// How long to wait before connecting again when the daemon's backlog is full.
const CONNECT_RETRY: Duration = Duration::from_millis(1);

/// Waits until `fd` is ready for `events` or the deadline passes (`TimedOut`).
///
/// `ppoll` with the exact time left: socket timeouts (`SO_RCVTIMEO`) are rounded up to scheduler
/// ticks and were measured 4–8 ms late here, which would break the "timeout + 5 ms" bound.
fn wait_ready(fd: &impl AsFd, events: PollFlags, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        let mut fds = [PollFd::new(fd.as_fd(), events)];
        match ppoll(&mut fds, Some(TimeSpec::from_duration(left)), None) {
            Ok(n) if n > 0 => return Ok(()),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
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
        events: PollFlags,
        mut op: impl FnMut(&mut UnixStream) -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            match op(&mut self.stream) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_ready(&self.stream, events, self.deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(PollFlags::POLLIN, |s| s.read(buf))
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(PollFlags::POLLOUT, |s| s.write(buf))
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
    fn an_event_is_queued_as_one_frame_named_by_its_time_and_bounded() {
        let dir = tmp_socket("queue").parent().unwrap().join("queue");
        let ev = Request::QueryJob { job_id: 7 };
        let a = queue(&dir, 2_000, &ev).unwrap();
        let b = queue(&dir, 1_000, &ev).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "created private");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
        assert!(names[0].starts_with("00000000000000001000-") && names[0].ends_with(QUEUE_SUFFIX));
        assert_eq!(dir.join(&names[0]), b);
        assert_eq!(dir.join(&names[1]), a);
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(read_frame::<_, Request>(&mut bytes.as_slice()).unwrap(), ev);
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A symlink in place of the directory is refused.
        let link = dir.with_file_name("queue-link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(queue(&link, 3_000, &ev)
            .unwrap_err()
            .contains("not a directory"));
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
