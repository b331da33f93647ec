//! The lifecycle events: applied to the registry as they arrive on the socket
//! ([`super::tracker::JobTracker::handle`]), or replayed from the plugin's queue
//! ([`take_queued`]). Either way the registry answers with the [`Action`]s the job worker must
//! perform, in order.

use ergon_protocol::{ErrorCode, Reply, Request};

use super::registry::Action;
use super::state::{event_time, lock, Inner, MAX_REPLAY_AGE_NS};

/// Apply a lifecycle event from a peer with uid `peer_uid` to the registry: the actions the
/// worker must perform, or the reply that refuses it. `max_age_ns` bounds how far in the past
/// the event's stamp is believed (see [`event_time`]).
pub(super) fn apply(
    inner: &Inner,
    request: &Request,
    peer_uid: u32,
    max_age_ns: u64,
) -> Result<Vec<Action>, Reply> {
    let access = inner.config.access;
    if !request.is_lifecycle() {
        return Err(Reply::error(ErrorCode::Internal, "not a lifecycle event"));
    }
    if !access.privileged(peer_uid) {
        tracing::warn!(
            uid = peer_uid,
            "refused a job event from an unprivileged client"
        );
        return Err(Reply::error(
            ErrorCode::PermissionDenied,
            format!(
                "job and step events may be sent only by root or SlurmUser (uid {}); this client \
                 runs as uid {peer_uid}",
                access
                    .slurm_uid
                    .map_or_else(|| "unresolved".to_owned(), |u| u.to_string())
            ),
        ));
    }
    let time = |stamp| event_time(stamp, max_age_ns);
    // The batch script's stdout, as slurmstepd opened it (patterns like %j expanded): where a
    // text report is appended. Read before taking the lock.
    let mut batch_stdout = match request {
        Request::StepStart(m) if m.step == ergon_protocol::StepId::Batch => m
            .pid
            .and_then(|pid| batch_stdout_path(&inner.config.proc_root, pid)),
        _ => None,
    };
    let mut reg = lock(&inner.registry);
    let result = match request {
        Request::JobStart(m) => reg.job_start(m, time(m.time)),
        Request::JobEnd(m) => reg.job_end(m, time(m.time)),
        Request::StepStart(m) => {
            let r = reg.step_start(m, time(m.time));
            if let (Ok(_), Some(path)) = (&r, batch_stdout.take()) {
                if let Some(job) = reg.get_mut(m.job_id) {
                    job.stdout_path = Some(path);
                }
            }
            r
        }
        Request::StepEnd(m) => reg.step_end(m, time(m.time)),
        _ => return Err(Reply::error(ErrorCode::Internal, "not a lifecycle event")),
    };
    result.map_err(|e| {
        // Logged once per 1,000 under a flood (each is also in the reply).
        let n = inner
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % 1000 == 0 {
            tracing::warn!(error = %e, refused_so_far = n + 1, "job event refused");
        }
        Reply::error(ErrorCode::Busy, e.to_string())
    })
}

/// Apply the events the plugin queued (see [`super::queue`]), oldest first, and remove them;
/// returns the actions they call for, in order, for the caller to perform at once (before any
/// later event's). An event the registry refuses (at its limits) stays queued for the next
/// pass.
pub(super) fn take_queued(inner: &Inner) -> Vec<Action> {
    let Some(dir) = &inner.config.queue_dir else {
        return Vec::new();
    };
    let access = inner.config.access;
    let mut n = 0;
    let mut out = Vec::new();
    for q in super::queue::pending(dir, |uid| access.privileged(uid)) {
        match apply(inner, &q.request, q.uid, MAX_REPLAY_AGE_NS) {
            Ok(actions) => {
                out.extend(actions);
                super::queue::done(&q);
                n += 1;
            }
            Err(Reply::Error {
                code: ErrorCode::Busy,
                reason,
            }) => {
                tracing::warn!(file = %q.path.display(), reason, "a queued event waits: ergond is at its limits");
                break;
            }
            Err(other) => {
                tracing::warn!(file = %q.path.display(), reply = ?other, "a queued event was refused; removed");
                super::queue::done(&q);
            }
        }
    }
    if n > 0 {
        inner
            .replayed
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        inner
            .journal_dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(events = n, queue = %dir.display(), "replayed events the plugin queued while ergond could not take them");
    }
    out
}

/// The file a process's stdout is, from `/proc/<pid>/fd/1`: an absolute path of a regular
/// file, else `None` (a terminal, a pipe, `/dev/null`, a deleted file).
pub fn batch_stdout_path(proc_root: &std::path::Path, pid: u32) -> Option<String> {
    let fd = proc_root.join(pid.to_string()).join("fd/1");
    let target = std::fs::read_link(&fd).ok()?;
    let text = target.to_str()?.to_owned();
    if !target.is_absolute() || text.ends_with(" (deleted)") {
        return None;
    }
    // Only a regular file (stat follows the link, as the process sees its stdout).
    std::fs::metadata(&fd)
        .ok()
        .filter(std::fs::Metadata::is_file)
        .map(|_| text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_stdout_is_the_regular_file_behind_fd_1() {
        let dir = tempfile::tempdir().unwrap();
        let fd = dir.path().join("77/fd");
        std::fs::create_dir_all(&fd).unwrap();
        let out = dir.path().join("slurm-5.out");
        std::fs::write(&out, b"").unwrap();
        std::os::unix::fs::symlink(&out, fd.join("1")).unwrap();
        assert_eq!(batch_stdout_path(dir.path(), 77).as_deref(), out.to_str());
        std::fs::remove_file(fd.join("1")).unwrap();
        std::os::unix::fs::symlink("/dev/null", fd.join("1")).unwrap();
        assert_eq!(
            batch_stdout_path(dir.path(), 77),
            None,
            "not a regular file"
        );
        assert_eq!(batch_stdout_path(dir.path(), 78), None, "no such process");
    }
}
