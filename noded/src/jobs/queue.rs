//! The events the SPANK plugin could not deliver, replayed.
//!
//! When ergond is down, hung, or refuses an event (at its limits), the plugin writes the
//! event's frame into the queue directory (`queue_dir`, default `queue/` beside the socket)
//! instead of losing it, in one file named by the event's time (see the plugin's
//! `client::queue`). ergond replays the directory at start — after restoring the journal and
//! before finishing the jobs that vanished while it was down, so a queued `JobEnd` gives a job
//! its real end — and about every second while it runs (an event queued while ergond was hung
//! may also have reached it through the socket: replaying it again is a duplicate the registry
//! ignores).
//!
//! What is trusted: a regular file (no symlink is followed), owned by root or SlurmUser (as the
//! socket's lifecycle events must come from them), no larger than a frame, in a directory that
//! is not writable by others. Anything else is set aside as `bad-<name>` with one log line,
//! never replayed and never silently dropped; at most [`MAX_BAD`] are kept.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ergon_protocol::{read_frame_with_limit, Request, MAX_FRAME_LEN};

/// Files replayed per pass at most (the rest wait for the next pass).
pub const MAX_PER_PASS: usize = 4096;
/// Set-aside files kept at most; beyond, the oldest bad file is removed.
pub const MAX_BAD: usize = 64;
/// The suffix of a queued event (the plugin writes `.tmp-…` first and renames).
pub const SUFFIX: &str = ".event";

/// One queued event.
#[derive(Debug)]
pub struct Queued {
    /// Its file.
    pub path: PathBuf,
    /// The event.
    pub request: Request,
    /// Who wrote it.
    pub uid: u32,
}

/// The queued events in `dir`, oldest first (by name: the plugin names them by time), at most
/// [`MAX_PER_PASS`]; files that cannot be trusted or read are set aside and logged. `trusted`
/// says whether a file owner may send lifecycle events.
pub fn pending(dir: &Path, trusted: impl Fn(u32) -> bool) -> Vec<Queued> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Vec::new();
    };
    if !meta.is_dir() {
        tracing::warn!(queue = %dir.display(), "the plugin's queue is not a directory; not replayed");
        return Vec::new();
    }
    if meta.permissions().mode() & 0o002 != 0 || !trusted(meta.uid()) {
        tracing::warn!(
            queue = %dir.display(),
            "the plugin's queue directory is writable by others or not owned by root or \
             SlurmUser; its events are not trusted and not replayed (fix its owner and mode)"
        );
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(SUFFIX) && !n.starts_with('.'))
        .collect();
    names.sort_unstable();
    names.truncate(MAX_PER_PASS);
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        match read_one(&path, &trusted) {
            Ok(q) => out.push(q),
            Err(why) => set_aside(dir, &name, &why),
        }
    }
    out
}

fn read_one(path: &Path, trusted: &impl Fn(u32) -> bool) -> Result<Queued, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if !trusted(meta.uid()) {
        return Err(format!(
            "owned by uid {}, not root or SlurmUser: only they may send job events",
            meta.uid()
        ));
    }
    if meta.len() > MAX_FRAME_LEN as u64 + 4 {
        return Err(format!("{} bytes, larger than a frame", meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    File::take(file, MAX_FRAME_LEN as u64 + 4)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    let request: Request = read_frame_with_limit(&mut bytes.as_slice(), MAX_FRAME_LEN)
        .map_err(|e| format!("not a frame ergond reads: {e}"))?;
    if !request.is_lifecycle() {
        return Err("not a job or step event".into());
    }
    Ok(Queued {
        path: path.to_path_buf(),
        request,
        uid: meta.uid(),
    })
}

/// Rename a file that cannot be replayed to `bad-<name>` (keeping at most [`MAX_BAD`]).
fn set_aside(dir: &Path, name: &str, why: &str) {
    tracing::warn!(
        file = %dir.join(name).display(),
        "a queued event cannot be replayed ({why}); it is kept as bad-{name} for inspection"
    );
    let _ = std::fs::rename(dir.join(name), dir.join(format!("bad-{name}")));
    let mut bad: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("bad-"))
                .collect()
        })
        .unwrap_or_default();
    if bad.len() > MAX_BAD {
        bad.sort_unstable();
        for old in &bad[..bad.len() - MAX_BAD] {
            let _ = std::fs::remove_file(dir.join(old));
        }
    }
}

/// Remove a replayed event's file.
pub fn done(q: &Queued) {
    if let Err(e) = std::fs::remove_file(&q.path) {
        tracing::warn!(file = %q.path.display(), error = %e, "cannot remove a replayed event; it will be replayed again (a harmless duplicate)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ergon_protocol::{encode_frame, JobEnd, Timestamp};

    fn end(job_id: u32) -> Request {
        Request::JobEnd(JobEnd {
            cluster: None,
            job_id,
            node: "n1".into(),
            time: Timestamp::from_unix_ns(1_700_000_000_000_000_000),
        })
    }

    #[test]
    fn replays_in_order_and_sets_aside_what_it_cannot_trust() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("queue");
        std::fs::create_dir(&q).unwrap();
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o700)).unwrap();
        let me = std::fs::metadata(&q).unwrap().uid();
        std::fs::write(
            q.join(format!("00000000000000000002-1-0{SUFFIX}")),
            encode_frame(&end(2)).unwrap(),
        )
        .unwrap();
        std::fs::write(
            q.join(format!("00000000000000000001-1-0{SUFFIX}")),
            encode_frame(&end(1)).unwrap(),
        )
        .unwrap();
        std::fs::write(
            q.join(format!("00000000000000000003-1-0{SUFFIX}")),
            b"\x00\x00\x00\x03abc",
        )
        .unwrap();
        std::fs::write(q.join(format!(".tmp-4{SUFFIX}")), b"partial").unwrap();
        std::os::unix::fs::symlink(
            "/etc/passwd",
            q.join(format!("00000000000000000005-1-0{SUFFIX}")),
        )
        .unwrap();
        std::fs::write(
            q.join(format!("00000000000000000006-1-0{SUFFIX}")),
            encode_frame(&Request::Ping).unwrap(),
        )
        .unwrap();
        let got = pending(&q, |uid| uid == me);
        let ids: Vec<u32> = got
            .iter()
            .map(|q| match &q.request {
                Request::JobEnd(e) => e.job_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![1, 2], "oldest first, only trusted events");
        for g in &got {
            done(g);
        }
        let mut left: Vec<String> = std::fs::read_dir(&q)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                format!(".tmp-4{SUFFIX}"),
                format!("bad-00000000000000000003-1-0{SUFFIX}"),
                format!("bad-00000000000000000005-1-0{SUFFIX}"),
                format!("bad-00000000000000000006-1-0{SUFFIX}"),
            ]
        );
        // Someone else's files are not events.
        assert!(pending(&q, |uid| uid != me).is_empty());
        // A directory others may write to is not trusted at all.
        std::fs::write(
            q.join(format!("00000000000000000007-1-0{SUFFIX}")),
            encode_frame(&end(7)).unwrap(),
        )
        .unwrap();
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(pending(&q, |uid| uid == me).is_empty());
        assert!(q.join(format!("00000000000000000007-1-0{SUFFIX}")).exists());
    }
}
