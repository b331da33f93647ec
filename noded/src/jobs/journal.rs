//! The job journal: what ergond needs to finish the jobs that are open when it stops or is
//! killed, in `state_dir/jobs.journal`.
//!
//! It holds the open jobs (as the registry has them), the [`Attributor`] (each open job's
//! running share, the node's balance, cgroup baselines, the last reading) and, per GPU and
//! RAPL zone, how the last reading's figures relate to the hardware counter (`offset_j`:
//! hardware counter − ergond's cumulative energy). After a restart, ergond reads the hardware
//! counters again: the difference is the energy of the outage, which it attributes to the
//! jobs that were open, as one interval, and records as a gap marked `recovered`. Where it
//! cannot be recovered (the counter reset, or RAPL may have wrapped more than once), the gap
//! is recorded as not recovered. cgroup CPU time and `/proc/stat` are cumulative in the kernel
//! and CLOCK_MONOTONIC is system-wide, so they carry across the restart unchanged; a reboot
//! (another `boot_id`) invalidates everything and the journal is set aside as
//! `jobs.journal.other-boot-<unix s>`.
//!
//! Format: `ERGONJ01`, the payload length (u64 LE), the payload (MessagePack), and the
//! payload's SHA-256. Written to a temporary file (no symlinks followed), fsync'd, renamed
//! over the old journal and the directory fsync'd: a crash leaves the old or the new journal,
//! never a mix. A journal that fails its checks is renamed `jobs.journal.bad-<unix s>` and
//! reported; it is never silently discarded. Bounded: the registry's limits bound the jobs, and
//! a journal larger than [`MAX_JOURNAL_BYTES`] is refused.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ergon_protocol::durable;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::attributor::Attributor;
use super::registry::Job;

/// The journal's file name in `state_dir`.
pub const JOURNAL_FILE: &str = "jobs.journal";
/// Largest journal read back.
pub const MAX_JOURNAL_BYTES: u64 = 256 * 1024 * 1024;
const MAGIC: &[u8; 8] = b"ERGONJ01";

/// How one device's cumulative figures relate to its hardware counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceFrame {
    /// GPU UUID or RAPL zone key.
    pub id: String,
    /// Hardware counter − cumulative energy (J) as of the last snapshot; `None` without a
    /// hardware counter.
    pub offset_j: Option<f64>,
    /// The counter's range (J) when it wraps.
    pub range_j: Option<f64>,
    /// Highest plausible power (W): a gap's energy above this × its duration is not believed.
    pub max_power_w: f64,
}

/// Everything journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalState {
    /// `/proc/sys/kernel/random/boot_id` when written.
    pub boot_id: String,
    /// When written (Unix ns).
    pub written_unix_ns: u64,
    /// Unix time of the attributor's last reading.
    pub last_unix_ns: u64,
    /// Open jobs (shared with the registry when writing: no copy under its lock).
    pub jobs: Vec<std::sync::Arc<Job>>,
    /// The attributor.
    pub attributor: Attributor,
    /// Per GPU (snapshot position).
    pub gpus: Vec<DeviceFrame>,
    /// Per RAPL zone (snapshot position).
    pub zones: Vec<DeviceFrame>,
    /// The jobs finished last, with their end (Unix ns): a late copy of one of their events,
    /// replayed from the plugin's queue after a restart, must not open them again.
    #[serde(default)]
    pub closed: Vec<(u32, u64)>,
}

/// Why the journal could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not a journal, truncated, or its checksum does not match.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// This boot's id (empty if unreadable).
pub fn boot_id(proc_root: &Path) -> String {
    std::fs::read_to_string(proc_root.join("sys/kernel/random/boot_id"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Write the journal atomically into `dir` (created 0700 if missing).
pub fn write(dir: &Path, state: &JournalState) -> Result<(), JournalError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JournalError::Io { path, source }
    };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let payload = rmp_serde::to_vec_named(state).map_err(|e| JournalError::Corrupt {
        path: dir.join(JOURNAL_FILE),
        reason: format!("cannot encode: {e}"),
    })?;
    let mut bytes = Vec::with_capacity(payload.len() + 48);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);
    bytes.extend_from_slice(&Sha256::digest(&payload));
    let path = dir.join(JOURNAL_FILE);
    durable::write(&path, &bytes, 0o600).map_err(|e| JournalError::Io {
        path: e.path,
        source: e.source,
    })?;
    Ok(())
}

/// Read the journal in `dir`: `Ok(None)` when there is none.
pub fn read(dir: &Path) -> Result<Option<JournalState>, JournalError> {
    let path = dir.join(JOURNAL_FILE);
    let corrupt = |reason: String| JournalError::Corrupt {
        path: path.clone(),
        reason,
    };
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(JournalError::Io { path, source }),
    };
    let mut bytes = Vec::new();
    f.take(MAX_JOURNAL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| JournalError::Io {
            path: path.clone(),
            source,
        })?;
    if bytes.len() as u64 > MAX_JOURNAL_BYTES {
        return Err(corrupt(format!("larger than {MAX_JOURNAL_BYTES} bytes")));
    }
    if bytes.len() < 48 || &bytes[..8] != MAGIC {
        return Err(corrupt(
            "not an ergond journal (bad magic or too short)".into(),
        ));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    if bytes.len() != 16 + len + 32 {
        return Err(corrupt(format!(
            "truncated: {} bytes, the header says {}",
            bytes.len(),
            16 + len + 32
        )));
    }
    let payload = &bytes[16..16 + len];
    if Sha256::digest(payload).as_slice() != &bytes[16 + len..] {
        return Err(corrupt("checksum mismatch".into()));
    }
    rmp_serde::from_slice(payload)
        .map(Some)
        .map_err(|e| corrupt(format!("cannot decode: {e}")))
}

/// Move a bad journal aside (`jobs.journal.bad-<unix s>`), returning its new path.
pub fn set_aside(dir: &Path, unix_s: u64) -> std::io::Result<PathBuf> {
    set_aside_as(dir, "bad", unix_s)
}

/// Move the journal aside as `jobs.journal.<what>-<unix s>` (`bad`: unreadable;
/// `other-boot`: written before a reboot), keeping at most the newest 8 of that kind.
pub fn set_aside_as(dir: &Path, what: &str, unix_s: u64) -> std::io::Result<PathBuf> {
    let to = dir.join(format!("{JOURNAL_FILE}.{what}-{unix_s}"));
    std::fs::rename(dir.join(JOURNAL_FILE), &to)?;
    let prefix = format!("{JOURNAL_FILE}.{what}-");
    let mut old: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let t = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((t, e.path()))
        })
        .collect();
    old.sort();
    let excess = old.len().saturating_sub(8);
    for (_, p) in old.into_iter().take(excess) {
        let _ = std::fs::remove_file(p);
    }
    Ok(to)
}

/// The energy of an outage from a device's hardware counter: `old_cum + old_offset` was the
/// counter at the last reading, `raw_now` is it now, `cum_now` ergond's new cumulative figure
/// read with it. Returns the last reading's value in the new cumulative frame, or `None` when
/// the outage's energy cannot be trusted (no counter, a reset, a possible extra wrap, or more
/// than `max_power_w` over `outage_s`).
pub fn map_across_restart(
    frame: &DeviceFrame,
    old_cum: Option<f64>,
    raw_now: Option<f64>,
    cum_now: f64,
    outage_s: f64,
) -> Option<f64> {
    let old_raw = old_cum? + frame.offset_j?;
    let raw_now = raw_now?;
    let most = frame.max_power_w * outage_s.max(0.0) * 1.5 + 1e-6;
    let gap = match frame.range_j {
        Some(range) if range > 0.0 => {
            if most >= range {
                return None; // it may have wrapped more than once
            }
            (raw_now - old_raw).rem_euclid(range)
        }
        _ => raw_now - old_raw,
    };
    if !(gap >= -1e-6 && gap <= most) {
        return None;
    }
    Some(cum_now - gap.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::AttributionConfig;
    use crate::jobs::manifest::NodeFacts;

    fn state() -> JournalState {
        JournalState {
            boot_id: "b".into(),
            written_unix_ns: 1,
            last_unix_ns: 2,
            jobs: Vec::new(),
            attributor: Attributor::new(&NodeFacts::default(), AttributionConfig::default()),
            gpus: vec![DeviceFrame {
                id: "GPU-1".into(),
                offset_j: Some(5.0),
                range_j: None,
                max_power_w: 700.0,
            }],
            zones: Vec::new(),
            closed: vec![(3, 1_700_000_000_000_000_000)],
        }
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_none());
        write(dir.path(), &state()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(state()));
        let path = dir.path().join(JOURNAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        std::fs::write(&path, &bytes[..n - 10]).unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let aside = set_aside(dir.path(), 7).unwrap();
        assert!(aside.ends_with("jobs.journal.bad-7") && aside.exists());
        assert!(read(dir.path()).unwrap().is_none());
    }

    #[test]
    fn a_symlinked_journal_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(JOURNAL_FILE)).unwrap();
        assert!(read(dir.path()).is_err());
        // Writing replaces the link itself; the target is untouched.
        write(dir.path(), &state()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"x");
        assert!(read(dir.path()).unwrap().is_some());
    }

    #[test]
    fn outage_energy_from_the_hardware_counter() {
        let gpu = DeviceFrame {
            id: "g".into(),
            offset_j: Some(1000.0),
            range_j: None,
            max_power_w: 700.0,
        };
        // Last reading: cumulative 50 J, so the counter was at 1050 J. Now it is at 1350 J
        // and the new cumulative is 2 J: the outage took 300 J, so the last reading is -298 J
        // in the new frame.
        assert_eq!(
            map_across_restart(&gpu, Some(50.0), Some(1350.0), 2.0, 10.0),
            Some(-298.0)
        );
        // A counter that went down (driver reload) or jumped beyond max power: unknown.
        assert_eq!(
            map_across_restart(&gpu, Some(50.0), Some(10.0), 2.0, 10.0),
            None
        );
        assert_eq!(
            map_across_restart(&gpu, Some(50.0), Some(99_999.0), 2.0, 10.0),
            None
        );
        assert_eq!(
            map_across_restart(&gpu, None, Some(1350.0), 2.0, 10.0),
            None
        );
        // RAPL with a 262 kJ range: one wrap is fine, an outage that could hide two is not.
        let zone = DeviceFrame {
            id: "package-0".into(),
            offset_j: Some(262_000.0),
            range_j: Some(262_143.0),
            max_power_w: 400.0,
        };
        // Counter at 262,100 J before, 57 J after a wrap: 100 J.
        let v = map_across_restart(&zone, Some(100.0), Some(57.0), 5.0, 2.0).unwrap();
        assert!((v - (5.0 - 100.0)).abs() < 1e-6, "{v}");
        assert_eq!(
            map_across_restart(&zone, Some(100.0), Some(57.0), 5.0, 1000.0),
            None
        );
    }
}
