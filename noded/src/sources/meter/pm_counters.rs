//! HPE Cray EX (and XC) power management counters: `/sys/cray/pm_counters/`.
//!
//! Files read (each holds a value, its unit and the controller's timestamp, as in
//! `2151069 J 1595271530318433 us`; `freshness`, `generation` and `raw_scan_hz` hold a bare
//! integer):
//! * `energy`: the node's accumulated energy in joules (accelerators included); `cpu*_energy`,
//!   `memory_energy`, `accel*_energy`: the same for one domain, selectable;
//! * `freshness`: advances every time the controller publishes new values; a read whose
//!   freshness did not advance is stale (the integrator does not take it as a new sample);
//! * `generation`: changes when the counters were reset (controller restart), which the
//!   integrator handles as a counter reset;
//! * `raw_scan_hz`: the publishing rate (10 Hz on EX), whence the resolution.
//!
//! A consistent read follows HPE's advice: read `freshness`, the counter, then `freshness`
//! again, and retry if it moved in between.

use super::{MeterError, MeterKind, MeterReading, NodeMeter, Quantity};
use crate::counter::CounterKind;
use crate::sources::{parse_u64, KernelFile};
use std::path::{Path, PathBuf};

/// The node-level counter read when none is configured.
pub const DEFAULT_COUNTER: &str = "energy";

/// Resolution assumed when `raw_scan_hz` is missing: 100 ms (10 Hz).
pub const DEFAULT_RESOLUTION_NS: u64 = 100_000_000;

/// Tries at a read whose `freshness` keeps moving under it.
const CONSISTENT_READ_TRIES: usize = 3;

/// The energy counters present under `root`: `energy`, `cpu*_energy`, `memory_energy`,
/// `accel*_energy`, sorted.
pub fn available(root: &Path) -> Result<Vec<String>, MeterError> {
    let entries = std::fs::read_dir(root).map_err(|source| MeterError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n == "energy" || n.ends_with("_energy"))
        .collect();
    names.sort();
    Ok(names)
}

/// Parse the leading integer of a pm_counters file (`"2151069 J 1595271530318433 us"`,
/// `"12"`), checking the unit when there is one.
pub fn parse_value(text: &[u8], unit: &str) -> Option<u64> {
    let s = std::str::from_utf8(text).ok()?;
    let mut fields = s.split_ascii_whitespace();
    let value = parse_u64(fields.next()?.as_bytes())?;
    match fields.next() {
        None => Some(value),
        Some(u) if u == unit => Some(value),
        Some(_) => None,
    }
}

/// One pm_counters energy counter, with `freshness` and `generation`.
#[derive(Debug)]
pub struct PmCountersMeter {
    root: PathBuf,
    counter: String,
    energy: KernelFile,
    freshness: KernelFile,
    generation: KernelFile,
    resolution_ns: u64,
}

impl PmCountersMeter {
    /// Open `counter` (a file name such as `energy`, `cpu0_energy`, `memory_energy`,
    /// `accel0_energy`) under `root` (normally `/sys/cray/pm_counters`).
    pub fn open(root: &Path, counter: &str) -> Result<Self, MeterError> {
        if !root.is_dir() {
            return Err(MeterError::NotFound(format!(
                "no HPE Cray pm_counters: {} does not exist (only HPE Cray EX and XC compute nodes \
                 have it)",
                root.display()
            )));
        }
        if counter.contains('/') || !(counter == "energy" || counter.ends_with("_energy")) {
            return Err(MeterError::Config(format!(
                "pm_counters counter {counter:?} is not an energy counter (energy, cpu0_energy, \
                 memory_energy, accel0_energy, ...)"
            )));
        }
        let open = |name: &str| {
            let path = root.join(name);
            KernelFile::open(&path).map_err(|source| MeterError::Io { path, source })
        };
        let energy = open(counter).map_err(|e| match e {
            MeterError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                MeterError::NotFound(format!(
                    "{} does not exist; counters here: {}",
                    path.display(),
                    available(root).unwrap_or_default().join(", ")
                ))
            }
            other => other,
        })?;
        let resolution_ns = KernelFile::open(&root.join("raw_scan_hz"))
            .and_then(|mut f| f.read_u64())
            .ok()
            .filter(|&hz| hz > 0)
            .map_or(DEFAULT_RESOLUTION_NS, |hz| 1_000_000_000 / hz);
        let mut meter = Self {
            root: root.to_path_buf(),
            counter: counter.to_string(),
            energy,
            freshness: open("freshness")?,
            generation: open("generation")?,
            resolution_ns,
        };
        // Read once now, so that an unreadable or garbled counter fails at start.
        meter.read()?;
        Ok(meter)
    }

    fn read_file(file: &mut KernelFile, unit: &str) -> Result<u64, MeterError> {
        match file.read_with_path() {
            Ok((path, bytes)) => parse_value(bytes, unit).ok_or_else(|| MeterError::Format {
                what: path.display().to_string(),
                why: format!(
                    "expected an unsigned integer{}, found {:?}",
                    if unit.is_empty() {
                        String::new()
                    } else {
                        format!(" in {unit}")
                    },
                    String::from_utf8_lossy(bytes)
                ),
            }),
            Err(source) => Err(MeterError::Io {
                path: file.path().to_path_buf(),
                source,
            }),
        }
    }
}

impl NodeMeter for PmCountersMeter {
    fn kind(&self) -> MeterKind {
        MeterKind::PmCounters
    }

    fn source(&self) -> String {
        format!("pm_counters {}", self.root.join(&self.counter).display())
    }

    fn resolution_ns(&self) -> u64 {
        self.resolution_ns
    }

    fn read(&mut self) -> Result<MeterReading, MeterError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let before = Self::read_file(&mut self.freshness, "")?;
            let generation = Self::read_file(&mut self.generation, "")?;
            let joules = Self::read_file(&mut self.energy, "J")?;
            let at_ns = crate::clock::monotonic_ns();
            let after = Self::read_file(&mut self.freshness, "")?;
            if before == after || tries == CONSISTENT_READ_TRIES {
                return Ok(MeterReading {
                    at_ns,
                    quantity: Quantity::Energy {
                        raw: joules,
                        joules_per_unit: 1.0,
                        kind: CounterKind::Resetting,
                    },
                    generation: Some(generation),
                    // An inconsistent last try is not marked fresh: the previous freshness.
                    freshness: Some(before),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_with_units_and_timestamps_parse() {
        assert_eq!(
            parse_value(b"2151069 J 1595271530318433 us\n", "J"),
            Some(2151069)
        );
        assert_eq!(parse_value(b"12\n", ""), Some(12));
        assert_eq!(parse_value(b"300 W 1595271530318433 us", "J"), None);
        assert_eq!(parse_value(b"-5 J", "J"), None);
        assert_eq!(parse_value(b"", "J"), None);
    }
}
