//! Linux hwmon power meters: `/sys/class/hwmon/hwmonN/` devices with `power<i>_average` (µW,
//! averaged by the meter over `power<i>_average_interval` ms) or `energy<i>_input` (a cumulative
//! µJ counter, which may reset). The ACPI power meter of many servers (`acpi_power_meter`,
//! `name` = `power_meter`) is the usual one.
//!
//! hwmon also carries per-core and per-socket energy (`amd_energy`) and power of single parts,
//! which are not the node's: a device is a node meter only if its `name` is in the configured
//! list ([`DEFAULT_NAMES`] unless configured). [`discover`] lists every hwmon device with a power
//! or energy file, for `ergond check`.

use super::{MeterError, MeterKind, MeterReading, NodeMeter, Quantity};
use crate::counter::CounterKind;
use crate::sources::KernelFile;
use std::path::{Path, PathBuf};

/// The hwmon `name`s taken as node meters when none are configured: the ACPI power meter.
pub const DEFAULT_NAMES: &[&str] = &["power_meter"];

/// Resolution assumed when a meter states no averaging interval: 1 s.
pub const DEFAULT_RESOLUTION_NS: u64 = 1_000_000_000;

/// What one hwmon device offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwmonDevice {
    /// The device's directory (`/sys/class/hwmon/hwmonN`).
    pub dir: PathBuf,
    /// Its `name` file.
    pub name: String,
    /// `energy<i>_input` files, by index.
    pub energy: Vec<u32>,
    /// `power<i>_average` files, by index.
    pub power_average: Vec<u32>,
}

/// Every hwmon device under `root` (normally `/sys/class/hwmon`) with a power or energy file,
/// sorted by directory name; none when `root` does not exist.
pub fn discover(root: &Path) -> Result<Vec<HwmonDevice>, MeterError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        // No hwmon class at all (a container without /sys/class/hwmon): no meter, no error.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(MeterError::Io {
                path: root.to_path_buf(),
                source,
            })
        }
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("hwmon"))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(files) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut energy = Vec::new();
        let mut power_average = Vec::new();
        for f in files.flatten() {
            let name = f.file_name();
            let name = name.to_string_lossy();
            if let Some(i) = indexed(&name, "energy", "_input") {
                energy.push(i);
            } else if let Some(i) = indexed(&name, "power", "_average") {
                power_average.push(i);
            }
        }
        if energy.is_empty() && power_average.is_empty() {
            continue;
        }
        energy.sort_unstable();
        power_average.sort_unstable();
        let name = super::read_text(&dir.join("name")).unwrap_or_default();
        out.push(HwmonDevice {
            dir,
            name,
            energy,
            power_average,
        });
    }
    Ok(out)
}

/// `<prefix><index><suffix>` → index.
fn indexed(file: &str, prefix: &str, suffix: &str) -> Option<u32> {
    file.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

/// One hwmon node meter: the first `energy<i>_input` of the device if it has one (a counter is
/// exact), otherwise its first `power<i>_average`.
#[derive(Debug)]
pub struct HwmonMeter {
    device: HwmonDevice,
    file: KernelFile,
    energy: bool,
    resolution_ns: u64,
}

impl HwmonMeter {
    /// Open the first device under `root` whose `name` is one of `names` (or of
    /// [`DEFAULT_NAMES`] when `names` is empty).
    pub fn open(root: &Path, names: &[String]) -> Result<Self, MeterError> {
        let devices = discover(root)?;
        let wanted = |n: &str| {
            if names.is_empty() {
                DEFAULT_NAMES.contains(&n)
            } else {
                names.iter().any(|w| w == n)
            }
        };
        let Some(device) = devices.iter().find(|d| wanted(&d.name)) else {
            let seen: Vec<String> = devices
                .iter()
                .map(|d| format!("{} ({})", d.name, d.dir.display()))
                .collect();
            return Err(MeterError::NotFound(format!(
                "no hwmon node power meter under {} named {}; devices with power or energy \
                 files: {}. Load the `acpi_power_meter` module, or name the device in \
                 [meters.hwmon] names",
                root.display(),
                if names.is_empty() {
                    DEFAULT_NAMES.join(", ")
                } else {
                    names.join(", ")
                },
                if seen.is_empty() {
                    "none".to_string()
                } else {
                    seen.join(", ")
                }
            )));
        };
        Self::open_device(device.clone())
    }

    /// Open a device found by [`discover`].
    pub fn open_device(device: HwmonDevice) -> Result<Self, MeterError> {
        let (path, energy, interval_path) =
            match (device.energy.first(), device.power_average.first()) {
                (Some(i), _) => (device.dir.join(format!("energy{i}_input")), true, None),
                (None, Some(i)) => (
                    device.dir.join(format!("power{i}_average")),
                    false,
                    Some(device.dir.join(format!("power{i}_average_interval"))),
                ),
                (None, None) => {
                    return Err(MeterError::NotFound(format!(
                        "{}: no energy*_input or power*_average file",
                        device.dir.display()
                    )))
                }
            };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MeterError::Io { path, source }
        };
        let mut file = KernelFile::open(&path).map_err(io(&path))?;
        // Read once now, so that an unreadable meter fails at start, not mid-run.
        file.read_u64().map_err(io(&path))?;
        let resolution_ns = interval_path
            .and_then(|p| KernelFile::open(&p).and_then(|mut f| f.read_u64()).ok())
            .filter(|&ms| ms > 0)
            .map_or(DEFAULT_RESOLUTION_NS, |ms| ms.saturating_mul(1_000_000));
        Ok(Self {
            device,
            file,
            energy,
            resolution_ns,
        })
    }

    /// The device this meter reads.
    pub fn device(&self) -> &HwmonDevice {
        &self.device
    }
}

impl NodeMeter for HwmonMeter {
    fn kind(&self) -> MeterKind {
        MeterKind::Hwmon
    }

    fn source(&self) -> String {
        format!(
            "hwmon {} ({})",
            self.device.name,
            self.file.path().display()
        )
    }

    fn resolution_ns(&self) -> u64 {
        self.resolution_ns
    }

    fn read(&mut self) -> Result<MeterReading, MeterError> {
        let value = self.file.read_u64().map_err(|source| MeterError::Io {
            path: self.file.path().to_path_buf(),
            source,
        })?;
        let at_ns = crate::clock::monotonic_ns();
        let quantity = if self.energy {
            Quantity::Energy {
                raw: value,
                joules_per_unit: 1e-6,
                kind: CounterKind::Resetting,
            }
        } else {
            Quantity::Power {
                watts: value as f64 / 1e6,
            }
        };
        Ok(MeterReading {
            at_ns,
            quantity,
            generation: None,
            freshness: None,
        })
    }
}
