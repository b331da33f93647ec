//! What RAPL measures, independent of how it is read: the domains, a zone's identity
//! ([`ZoneKey`]) and how to interpret its raw values ([`ZoneInfo`]). Both backends
//! ([`super::rapl`]'s powercap reader and [`super::perf`]) produce these.

use std::fmt;

use crate::counter::{CounterKind, CounterSpec};

/// What a RAPL zone measures.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RaplDomain {
    /// Whole package (socket or die).
    Package,
    /// CPU cores (PP0).
    Core,
    /// Uncore / integrated graphics (PP1; perf calls it `energy-gpu`).
    Uncore,
    /// DRAM attached to the package (absent on AMD).
    Dram,
    /// Platform (whole SoC, client machines).
    Psys,
    /// A domain name this version does not know; kept rather than dropped.
    Other(String),
}

impl RaplDomain {
    /// The domain a powercap sub-zone's `name` file names.
    pub fn from_subzone_name(name: &str) -> Self {
        match name {
            "core" => RaplDomain::Core,
            "uncore" => RaplDomain::Uncore,
            "dram" => RaplDomain::Dram,
            "psys" => RaplDomain::Psys,
            other => RaplDomain::Other(other.to_string()),
        }
    }
}

impl fmt::Display for RaplDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RaplDomain::Package => f.write_str("package"),
            RaplDomain::Core => f.write_str("core"),
            RaplDomain::Uncore => f.write_str("uncore"),
            RaplDomain::Dram => f.write_str("dram"),
            RaplDomain::Psys => f.write_str("psys"),
            RaplDomain::Other(s) => f.write_str(s),
        }
    }
}

/// Identity of a zone: which socket (and die) and which domain. Stable across machines, so it
/// is what metrics, manifests and attribution refer to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ZoneKey {
    /// Socket (physical package); `None` for platform-wide zones (psys).
    pub socket: Option<u32>,
    /// Die within the package, on multi-die parts that expose `package-N-die-M`.
    pub die: Option<u32>,
    /// Domain.
    pub domain: RaplDomain,
}

impl fmt::Display for ZoneKey {
    /// `package-0`, `package-0-die-1`, `package-1:dram`, `psys`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(socket) = self.socket else {
            return write!(f, "{}", self.domain);
        };
        write!(f, "package-{socket}")?;
        if let Some(die) = self.die {
            write!(f, "-die-{die}")?;
        }
        if self.domain != RaplDomain::Package {
            write!(f, ":{}", self.domain)?;
        }
        Ok(())
    }
}

/// One zone: identity and how to interpret its raw values.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneInfo {
    /// What the zone measures.
    pub key: ZoneKey,
    /// Where the values come from (powercap directory or perf event + CPU), for logs/manifests.
    pub origin: String,
    /// Wrap behaviour of the raw values.
    pub kind: CounterKind,
    /// Joules per raw unit.
    pub joules_per_unit: f64,
}

impl ZoneInfo {
    /// The counter specification for this zone, given a power limit for plausibility checks.
    pub fn counter_spec(&self, max_power_w: f64, margin: f64) -> CounterSpec {
        CounterSpec {
            kind: self.kind,
            joules_per_unit: self.joules_per_unit,
            max_power_w,
            margin,
            // RAPL updates about every millisecond.
            staleness_ns: 2_000_000,
        }
    }
}
