//! [`Timestamp`]: wall-clock instants as they travel between ergon's parts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A wall-clock instant in nanoseconds since the Unix epoch.
///
/// Events are stamped where they happen (the SPANK plugin stamps a step's start in
/// slurmstepd) so that ergond can read its counters for the exact interval even when a
/// message is delayed. Nanoseconds in a `u64` reach the year 2554, and a plain integer
/// serialises compactly and identically in msgpack and JSON, so the type is
/// `#[serde(transparent)]`: on the wire it is just the number.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp {
    /// Nanoseconds since 1970-01-01T00:00:00Z.
    pub unix_ns: u64,
}

impl Timestamp {
    /// The instant `unix_ns` nanoseconds after the epoch.
    pub const fn from_unix_ns(unix_ns: u64) -> Self {
        Self { unix_ns }
    }

    /// The current wall-clock time.
    ///
    /// A clock set before 1970 gives the epoch rather than failing: a timestamp is
    /// informational and never worth aborting a Slurm hook for.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// This instant as a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.unix_ns)
    }

    /// Seconds since the epoch, as a float, for arithmetic on durations and rates.
    pub fn as_secs_f64(self) -> f64 {
        self.unix_ns as f64 / 1e9
    }

    /// Seconds from `earlier` to `self`; negative if `earlier` is in fact later.
    pub fn seconds_since(self, earlier: Timestamp) -> f64 {
        if self.unix_ns >= earlier.unix_ns {
            (self.unix_ns - earlier.unix_ns) as f64 / 1e9
        } else {
            -((earlier.unix_ns - self.unix_ns) as f64 / 1e9)
        }
    }
}

impl From<SystemTime> for Timestamp {
    /// Times before the epoch clamp to the epoch and times past 2554 saturate.
    fn from(t: SystemTime) -> Self {
        let unix_ns = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Err(_) => 0,
        };
        Self { unix_ns }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        t.to_system_time()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_time_round_trip_is_exact() {
        let t = Timestamp::from_unix_ns(1_700_000_000_123_456_789);
        assert_eq!(Timestamp::from(t.to_system_time()), t);
    }

    #[test]
    fn before_epoch_clamps_to_zero() {
        let t = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(Timestamp::from(t).unix_ns, 0);
    }

    #[test]
    fn seconds_since_is_signed() {
        let a = Timestamp::from_unix_ns(1_000_000_000);
        let b = Timestamp::from_unix_ns(3_500_000_000);
        assert_eq!(b.seconds_since(a), 2.5);
        assert_eq!(a.seconds_since(b), -2.5);
    }

    #[test]
    fn serialises_as_a_bare_number() {
        let t = Timestamp::from_unix_ns(42);
        assert_eq!(serde_json::to_string(&t).unwrap(), "42");
    }
}
