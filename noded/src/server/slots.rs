//! The open connections of the socket server and the admission policy (which connection makes
//! room for a new one), and rate-limited logging for floods. Shared by the accept loop
//! ([`super::listener`]) and each connection ([`super::connection`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use super::ServerLimits;

/// One open connection, as the admission policy sees it.
#[derive(Debug)]
struct Open {
    uid: u32,
    /// When it last became idle (accepted, or replied to).
    idle_since: Instant,
    /// Between a complete frame and its reply: never evicted.
    busy: bool,
    /// Closes the connection when notified.
    close: Arc<Notify>,
}

/// The open connections, shared by the accept loop and the connections themselves.
#[derive(Debug, Default)]
pub struct Connections {
    next_id: u64,
    open: HashMap<u64, Open>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The uid already holds its share of connections.
    PerPeer(usize),
    /// Every slot is busy with a request (none idle to make room).
    Full(usize),
}

impl Connections {
    /// Admit a connection from `uid`, closing the longest-idle connection if the cap is
    /// reached. Returns its id and the [`Notify`] that closes it, and whether another
    /// connection was evicted to make room.
    pub fn admit(
        &mut self,
        uid: u32,
        limits: &ServerLimits,
        now: Instant,
    ) -> Result<(u64, Arc<Notify>, bool), Refused> {
        let exempt = uid == 0 || Some(uid) == limits.trusted_uid;
        if !exempt {
            let held = self.open.values().filter(|c| c.uid == uid).count();
            if held >= limits.max_per_peer {
                return Err(Refused::PerPeer(limits.max_per_peer));
            }
        }
        let mut evicted = false;
        if self.open.len() >= limits.max_connections.max(1) {
            let oldest = self
                .open
                .iter()
                .filter(|(_, c)| !c.busy)
                .min_by_key(|(id, c)| (c.idle_since, **id))
                .map(|(id, _)| *id);
            match oldest {
                Some(id) => {
                    if let Some(c) = self.open.remove(&id) {
                        // notify_one stores a permit: the connection closes even if it is not
                        // waiting on it yet.
                        c.close.notify_one();
                    }
                    evicted = true;
                }
                None => return Err(Refused::Full(limits.max_connections)),
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let close = Arc::new(Notify::new());
        self.open.insert(
            id,
            Open {
                uid,
                idle_since: now,
                busy: false,
                close: Arc::clone(&close),
            },
        );
        Ok((id, close, evicted))
    }

    /// Mark connection `id` busy (a complete frame arrived) or idle again (its reply is out).
    pub fn set_busy(&mut self, id: u64, busy: bool, now: Instant) {
        if let Some(c) = self.open.get_mut(&id) {
            c.busy = busy;
            if !busy {
                c.idle_since = now;
            }
        }
    }

    /// Forget connection `id` (it ended).
    pub fn remove(&mut self, id: u64) {
        self.open.remove(&id);
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// A connection's handle on the shared [`Connections`]: marks it busy and idle, and removes it
/// when dropped.
pub struct Slot {
    id: u64,
    conns: Arc<Mutex<Connections>>,
    close: Arc<Notify>,
}

pub(super) fn lock(m: &Mutex<Connections>) -> MutexGuard<'_, Connections> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Slot {
    /// The handle of connection `id` (as [`Connections::admit`] gave it).
    pub fn new(id: u64, conns: Arc<Mutex<Connections>>, close: Arc<Notify>) -> Self {
        Self { id, conns, close }
    }

    /// A complete frame arrived: the connection may not be evicted until its reply is out.
    pub fn busy(&self) {
        lock(&self.conns).set_busy(self.id, true, Instant::now());
    }

    /// The reply is out: the connection is idle (and evictable) again.
    pub fn idle(&self) {
        lock(&self.conns).set_busy(self.id, false, Instant::now());
    }

    /// Completes when the connection was evicted to make room for another.
    pub async fn evicted(&self) {
        self.close.notified().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.conns).remove(self.id);
    }
}

/// A log line at most once per [`LOG_EVERY`] for a kind of event that can come in floods
/// (bad frames, refused or evicted connections); the count since the last line goes with it.
pub const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Rate limiting for one kind of log line: the first occurrence is logged, then at most one
/// line per [`LOG_EVERY`] with the number suppressed in between.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// Occurrences not yet logged.
    pending: AtomicU64,
    /// When the last line was logged (ms since the limiter's epoch, +1; 0 = never).
    last_ms: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl LogLimit {
    /// Count one occurrence; `Some(n)` when a line should be logged now, `n` being the
    /// occurrences it stands for (this one included).
    pub fn hit(&self) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(Instant::now);
        let now_ms = epoch.elapsed().as_millis() as u64 + 1;
        self.pending.fetch_add(1, Ordering::Relaxed);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= LOG_EVERY.as_millis() as u64;
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // What accumulated, this one included.
            return Some(self.pending.swap(0, Ordering::Relaxed).max(1));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(max: usize, per_peer: usize) -> ServerLimits {
        ServerLimits {
            max_connections: max,
            max_per_peer: per_peer,
            ..ServerLimits::default()
        }
    }

    #[test]
    fn the_longest_idle_connection_makes_room_and_busy_ones_never_do() {
        let l = limits(3, 10);
        let mut c = Connections::default();
        let t0 = Instant::now();
        let (a, close_a, _) = c.admit(0, &l, t0).unwrap();
        let (b, _, _) = c.admit(0, &l, t0 + Duration::from_millis(1)).unwrap();
        let (d, _, _) = c.admit(0, &l, t0 + Duration::from_millis(2)).unwrap();
        // `a` is busy with a request: the next oldest idle one (`b`) goes.
        c.set_busy(a, true, t0 + Duration::from_millis(3));
        let (_, _, evicted) = c.admit(0, &l, t0 + Duration::from_millis(4)).unwrap();
        assert!(evicted);
        assert_eq!(c.len(), 3);
        assert!(c.open.contains_key(&a) && !c.open.contains_key(&b) && c.open.contains_key(&d));
        // Once `a` has replied it is idle since then, younger than `d`.
        c.set_busy(a, false, t0 + Duration::from_millis(5));
        c.admit(0, &l, t0 + Duration::from_millis(6)).unwrap();
        assert!(c.open.contains_key(&a) && !c.open.contains_key(&d));
        // Nothing idle: refused.
        let busy: Vec<u64> = c.open.keys().copied().collect();
        for id in busy {
            c.set_busy(id, true, t0);
        }
        assert_eq!(c.admit(0, &l, t0).unwrap_err(), Refused::Full(3));
        // `a` was never evicted, so its close signal has no permit.
        assert!(futures_lite_now(close_a));
    }

    /// Whether `close` has no stored permit (the connection was not told to close).
    fn futures_lite_now(close: Arc<Notify>) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(5), close.notified())
                .await
                .is_err()
        })
    }

    #[test]
    fn one_user_cannot_take_every_slot_but_root_and_slurm_user_are_exempt() {
        let mut l = limits(100, 2);
        l.trusted_uid = Some(64030);
        let mut c = Connections::default();
        let t = Instant::now();
        c.admit(1000, &l, t).unwrap();
        c.admit(1000, &l, t).unwrap();
        assert_eq!(c.admit(1000, &l, t).unwrap_err(), Refused::PerPeer(2));
        c.admit(1001, &l, t).unwrap();
        for _ in 0..5 {
            c.admit(0, &l, t).unwrap();
            c.admit(64030, &l, t).unwrap();
        }
        assert_eq!(c.len(), 13);
    }

    #[test]
    fn a_flood_is_logged_once_then_summarised() {
        let l = LogLimit::default();
        assert_eq!(l.hit(), Some(1));
        for _ in 0..10_000 {
            assert_eq!(l.hit(), None);
        }
        // The next line, when due, stands for everything suppressed.
        l.last_ms.store(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        let epoch = *l.epoch.get().unwrap();
        l.last_ms.store(
            (epoch.elapsed().as_millis() as u64 + 1).saturating_sub(LOG_EVERY.as_millis() as u64),
            Ordering::Relaxed,
        );
        assert_eq!(l.hit(), Some(10_001));
    }
}
