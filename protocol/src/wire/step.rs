//! [`StepId`]: Slurm step ids, including the special steps.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// `SLURM_PENDING_STEP` in Slurm 22.05's `slurm.h`.
pub const SLURM_PENDING_STEP: u32 = 0xffff_fffd;
/// `SLURM_EXTERN_CONT` in Slurm 22.05's `slurm.h`: the step that adopts processes started
/// outside Slurm (e.g. by `pam_slurm_adopt`).
pub const SLURM_EXTERN_CONT: u32 = 0xffff_fffc;
/// `SLURM_BATCH_SCRIPT` in Slurm 22.05's `slurm.h`: the step running the batch script.
pub const SLURM_BATCH_SCRIPT: u32 = 0xffff_fffb;
/// `SLURM_INTERACTIVE_STEP` in Slurm 22.05's `slurm.h`: `salloc`'s interactive step.
pub const SLURM_INTERACTIVE_STEP: u32 = 0xffff_fffa;

/// A step of a Slurm job.
///
/// Slurm passes step ids around as a `u32` in which a few values near `u32::MAX` name special
/// steps. Keeping them as enum variants means code matches on `StepId::Batch` instead of
/// on a magic number, and prints them the way `sacct` does (`1234.batch`).
///
/// Serialised (msgpack and JSON alike) as the string [`Display`](fmt::Display) gives,
/// e.g. `"batch"` or `"0"`, so manifests read naturally; deserialisation also accepts the raw
/// `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StepId {
    /// The batch script (`SLURM_BATCH_SCRIPT`).
    Batch,
    /// The extern step (`SLURM_EXTERN_CONT`).
    Extern,
    /// The interactive step of `salloc` (`SLURM_INTERACTIVE_STEP`).
    Interactive,
    /// A step whose id is not yet assigned (`SLURM_PENDING_STEP`).
    Pending,
    /// An ordinary numbered step (`srun` inside a job). Construct through
    /// [`StepId::from_raw`] so that special values are never wrapped here.
    Numbered(u32),
}

impl StepId {
    /// Interpret Slurm's raw `u32` step id.
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            SLURM_PENDING_STEP => StepId::Pending,
            SLURM_EXTERN_CONT => StepId::Extern,
            SLURM_BATCH_SCRIPT => StepId::Batch,
            SLURM_INTERACTIVE_STEP => StepId::Interactive,
            n => StepId::Numbered(n),
        }
    }

    /// Slurm's raw `u32` for this step.
    pub const fn to_raw(self) -> u32 {
        match self {
            StepId::Pending => SLURM_PENDING_STEP,
            StepId::Extern => SLURM_EXTERN_CONT,
            StepId::Batch => SLURM_BATCH_SCRIPT,
            StepId::Interactive => SLURM_INTERACTIVE_STEP,
            StepId::Numbered(n) => n,
        }
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepId::Batch => f.write_str("batch"),
            StepId::Extern => f.write_str("extern"),
            StepId::Interactive => f.write_str("interactive"),
            StepId::Pending => f.write_str("pending"),
            StepId::Numbered(n) => write!(f, "{n}"),
        }
    }
}

/// A string that is not a step id; see [`StepId`]'s `FromStr`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid step id {0:?}: expected a step number or one of \"batch\", \"extern\", \"interactive\", \"pending\""
)]
pub struct StepIdError(pub String);

impl FromStr for StepId {
    type Err = StepIdError;

    /// Parses what [`Display`](fmt::Display) prints. `"TBD"` is also accepted for
    /// [`StepId::Pending`], and a decimal number goes through [`StepId::from_raw`], so the
    /// raw special values map to their variants.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "batch" => Ok(StepId::Batch),
            "extern" => Ok(StepId::Extern),
            "interactive" => Ok(StepId::Interactive),
            "pending" | "TBD" => Ok(StepId::Pending),
            _ if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
                .parse::<u32>()
                .map(StepId::from_raw)
                .map_err(|_| StepIdError(s.to_owned())),
            _ => Err(StepIdError(s.to_owned())),
        }
    }
}

impl Serialize for StepId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            StepId::Numbered(n) => serializer.collect_str(n),
            other => serializer.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for StepId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StepVisitor;

        impl Visitor<'_> for StepVisitor {
            type Value = StepId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Slurm step id (\"batch\", \"extern\", … or a number)")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<StepId, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StepId, E> {
                u32::try_from(v)
                    .map(StepId::from_raw)
                    .map_err(|_| E::custom(format_args!("step id {v} does not fit in 32 bits")))
            }
        }

        deserializer.deserialize_any(StepVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_match_slurm_22_05() {
        assert_eq!(StepId::Pending.to_raw(), 0xfffffffd);
        assert_eq!(StepId::Extern.to_raw(), 0xfffffffc);
        assert_eq!(StepId::Batch.to_raw(), 0xfffffffb);
        assert_eq!(StepId::Interactive.to_raw(), 0xfffffffa);
        assert_eq!(StepId::from_raw(0xfffffffb), StepId::Batch);
        assert_eq!(StepId::from_raw(0xfffffffc), StepId::Extern);
        assert_eq!(StepId::from_raw(0xfffffffa), StepId::Interactive);
        assert_eq!(StepId::from_raw(0xfffffffd), StepId::Pending);
        assert_eq!(StepId::from_raw(0), StepId::Numbered(0));
        assert_eq!(StepId::from_raw(0xfffffffe), StepId::Numbered(0xfffffffe));
    }

    #[test]
    fn raw_round_trip_for_every_special_and_some_numbers() {
        for raw in [
            0,
            1,
            17,
            0xfffffff0,
            0xfffffffa,
            0xfffffffb,
            0xfffffffc,
            0xfffffffd,
            u32::MAX,
        ] {
            assert_eq!(StepId::from_raw(raw).to_raw(), raw);
        }
    }

    #[test]
    fn display_and_parse_agree() {
        for step in [
            StepId::Batch,
            StepId::Extern,
            StepId::Interactive,
            StepId::Pending,
            StepId::Numbered(0),
            StepId::Numbered(42),
        ] {
            assert_eq!(step.to_string().parse::<StepId>(), Ok(step));
        }
        assert_eq!(StepId::Batch.to_string(), "batch");
        assert_eq!(StepId::Numbered(3).to_string(), "3");
        assert_eq!("TBD".parse::<StepId>(), Ok(StepId::Pending));
        assert_eq!("4294967291".parse::<StepId>(), Ok(StepId::Batch));
    }

    #[test]
    fn parse_rejects_junk() {
        for bad in ["", "Batch", "-1", "+1", "1.0", "4294967296", " 1", "step_0"] {
            assert!(bad.parse::<StepId>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn json_form_is_the_display_string_and_accepts_raw() {
        assert_eq!(
            serde_json::to_string(&StepId::Extern).unwrap(),
            "\"extern\""
        );
        assert_eq!(
            serde_json::to_string(&StepId::Numbered(7)).unwrap(),
            "\"7\""
        );
        assert_eq!(
            serde_json::from_str::<StepId>("4294967291").unwrap(),
            StepId::Batch
        );
        assert_eq!(
            serde_json::from_str::<StepId>("\"7\"").unwrap(),
            StepId::Numbered(7)
        );
    }
}
