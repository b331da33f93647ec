//! A stand-in for ergond's socket, for testing the SPANK plugin before (and apart from) ergond.
//! Not shipped.
//!
//! ```text
//! ergon-test-listener SOCKET EVENTS.jsonl [--mode ok|hang|garbage|refuse]
//! ```
//! Accepts the wire protocol on SOCKET and appends every request it decodes to EVENTS.jsonl as
//! one JSON object per line: `{"peer_uid":0,"received_unix_ns":…,"request":{…}}`. Modes:
//! `ok` answers `Ok` at once; `hang` accepts and never answers; `garbage` answers bytes that are
//! not a frame; `refuse` answers an error. Each connection is served on its own thread, so one
//! hung exchange never blocks the next.

#![deny(unsafe_code)]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ergon_protocol::{read_frame, write_frame, ErrorCode, Reply, Request, Timestamp};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    Hang,
    Garbage,
    Refuse,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: ergon-test-listener SOCKET EVENTS.jsonl [--mode ok|hang|garbage|refuse]");
        std::process::exit(2);
    }
    let socket = PathBuf::from(&args[1]);
    let events = PathBuf::from(&args[2]);
    let mode = match args.get(4).map(String::as_str) {
        None | Some("ok") => Mode::Ok,
        Some("hang") => Mode::Hang,
        Some("garbage") => Mode::Garbage,
        Some("refuse") => Mode::Refuse,
        Some(m) => {
            eprintln!("unknown mode {m}");
            std::process::exit(2);
        }
    };
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap_or_else(|e| {
        eprintln!("cannot bind {}: {e}", socket.display());
        std::process::exit(1);
    });
    // slurmstepd's task hooks run as root, but let any local user connect, like ergond does.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777));
    let out = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&events)
            .expect("events file"),
    ));
    println!("listening on {}", socket.display());
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let out = Arc::clone(&out);
        std::thread::spawn(move || serve(stream, mode, &out));
    }
}

fn peer_uid(stream: &UnixStream) -> Option<u32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.uid())
}

fn serve(mut stream: UnixStream, mode: Mode, out: &Mutex<std::fs::File>) {
    let uid = peer_uid(&stream);
    let request: Request = match read_frame(&mut stream) {
        Ok(r) => r,
        // A connection closed before any byte: the harness's readiness probe.
        Err(ergon_protocol::FrameError::Closed) => return,
        Err(e) => {
            eprintln!("bad frame: {e}");
            return;
        }
    };
    let line = serde_json::json!({
        "peer_uid": uid,
        "received_unix_ns": Timestamp::now().unix_ns,
        "mode": match mode { Mode::Ok => "ok", Mode::Hang => "hang", Mode::Garbage => "garbage", Mode::Refuse => "refuse" },
        "request": request,
    });
    {
        let mut f = out.lock().unwrap();
        // One write per line (a reader never sees half of one from us).
        let _ = f.write_all(format!("{line}\n").as_bytes());
        let _ = f.flush();
    }
    match mode {
        Mode::Ok => {
            let _ = write_frame(&mut stream, &Reply::Ok);
        }
        Mode::Refuse => {
            let _ = write_frame(
                &mut stream,
                &Reply::error(ErrorCode::Internal, "test listener refuses"),
            );
        }
        Mode::Garbage => {
            let _ = stream.write_all(b"\xff\xff\xff\xffnot a frame");
        }
        Mode::Hang => {
            // Keep the connection open and silent until the client gives up.
            let mut buf = [0u8; 1];
            let _ = std::io::Read::read(&mut stream, &mut buf);
        }
    }
}
