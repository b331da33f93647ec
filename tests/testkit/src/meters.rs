//! Generated trees for whole-node power meters: hwmon class directories
//! (`/sys/class/hwmon/hwmonN`, each a symbolic link to its device's directory as in sysfs) and
//! HPE Cray `/sys/cray/pm_counters`. Counter files are rewritten in place at a fixed width, so a
//! meter that keeps them open reads the new value (see [`crate::write_counter_file`]).

use crate::hw::{write_file, write_in_place};
use std::path::{Path, PathBuf};

/// One hwmon device to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwmonFixture {
    /// Its `name` file (`power_meter` for the ACPI power meter).
    pub name: String,
    /// Other files and their contents (`power1_average`, `power1_average_interval`,
    /// `energy1_input`, `temp1_input`, ...).
    pub files: Vec<(String, String)>,
}

impl HwmonFixture {
    /// A device named `name` with no attribute yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            files: Vec::new(),
        }
    }

    /// Add an attribute file.
    pub fn with(mut self, file: &str, contents: &str) -> Self {
        self.files.push((file.to_string(), contents.to_string()));
        self
    }

    /// The ACPI power meter (`acpi_power_meter`): `power1_average` in µW, averaged over
    /// `power1_average_interval` ms, plus the descriptive files the driver also writes.
    pub fn acpi_power_meter(microwatts: u64, interval_ms: u64) -> Self {
        Self::new("power_meter")
            .with("power1_average", &format!("{microwatts:020}\n"))
            .with("power1_average_interval", &format!("{interval_ms}\n"))
            .with("power1_average_interval_min", "1000\n")
            .with("power1_average_interval_max", "300000\n")
            .with("power1_is_battery", "0\n")
            .with("power1_model_number", "Platform Power Meter\n")
            .with("power1_oem_info", "Meter measures total domain power\n")
    }
}

/// A generated `/sys/class/hwmon` (with the device directories it links to beside it).
#[derive(Debug, Clone)]
pub struct HwmonTree {
    class: PathBuf,
    dirs: Vec<PathBuf>,
}

impl HwmonTree {
    /// Create `<root>/class/hwmon/hwmon<i>` → `<root>/devices/dev<i>/hwmon/hwmon<i>` for each
    /// device, in order.
    pub fn create(root: &Path, devices: &[HwmonFixture]) -> Self {
        let class = root.join("class/hwmon");
        std::fs::create_dir_all(&class).expect("create hwmon class directory");
        let mut dirs = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let dev = root.join(format!("devices/dev{i}/hwmon/hwmon{i}"));
            write_file(&dev.join("name"), &format!("{}\n", d.name));
            for (f, text) in &d.files {
                write_file(&dev.join(f), text);
            }
            let link = class.join(format!("hwmon{i}"));
            std::os::unix::fs::symlink(&dev, &link).expect("link hwmon device");
            dirs.push(dev);
        }
        Self { class, dirs }
    }

    /// The class directory (pass as the hwmon root).
    pub fn root(&self) -> &Path {
        &self.class
    }

    /// Rewrite device `index`'s `file` with `value`, zero-padded to a fixed width.
    pub fn set(&self, index: usize, file: &str, value: u64) {
        write_in_place(&self.dirs[index].join(file), &format!("{value:020}\n"));
    }
}

/// A generated `/sys/cray/pm_counters`.
#[derive(Debug, Clone)]
pub struct PmCountersTree {
    root: PathBuf,
}

impl PmCountersTree {
    /// Create the files of an HPE Cray EX node with `cpus` CPU and `accels` accelerator
    /// domains: every counter at 0 J, `freshness` 0, `generation` 1, `raw_scan_hz` 10, and the
    /// power, cap and version files the node also has.
    pub fn create(root: &Path, cpus: u32, accels: u32) -> Self {
        let t = Self {
            root: root.to_path_buf(),
        };
        let mut energy = vec!["energy".to_string(), "memory_energy".to_string()];
        let mut power = vec!["power".to_string(), "memory_power".to_string()];
        for c in 0..cpus {
            energy.push(format!("cpu{c}_energy"));
            power.push(format!("cpu{c}_power"));
        }
        for a in 0..accels {
            energy.push(format!("accel{a}_energy"));
            power.push(format!("accel{a}_power"));
        }
        for e in &energy {
            t.set_energy(e, 0);
        }
        for p in &power {
            write_in_place(&root.join(p), &format!("{:010} W {:020} us\n", 0, 0));
        }
        t.set_freshness(0);
        t.set_generation(1);
        write_file(&root.join("raw_scan_hz"), "10\n");
        write_file(&root.join("power_cap"), "0 W\n");
        write_file(&root.join("startup"), "1595271530318433\n");
        write_file(&root.join("version"), "2\n");
        t
    }

    /// The directory (pass as the pm_counters root).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Set an energy counter (`energy`, `cpu0_energy`, ...), as `<J> J <timestamp> us`.
    pub fn set_energy(&self, counter: &str, joules: u64) {
        write_in_place(
            &self.root.join(counter),
            &format!("{joules:010} J {:020} us\n", 1_595_271_530_318_433u64),
        );
    }

    /// Set `freshness`.
    pub fn set_freshness(&self, value: u64) {
        write_in_place(&self.root.join("freshness"), &format!("{value:020}\n"));
    }

    /// Set `generation`.
    pub fn set_generation(&self, value: u64) {
        write_in_place(&self.root.join("generation"), &format!("{value:020}\n"));
    }

    /// Write raw text into a file (to garble one).
    pub fn write_raw(&self, file: &str, text: &str) {
        write_file(&self.root.join(file), text);
    }
}

/// Write a BMC credentials file (`username = "admin"`, `password = "secret"`: what the tests'
/// emulated BMCs accept) at `path` with `mode` (ergond wants root-owned 0600 or 0400); returns
/// `path`.
pub fn write_bmc_credentials(path: &Path, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(
        path,
        format!(
            "username = \"{}\"\npassword = \"{}\"\n",
            crate::ipmi_sim::USER,
            crate::ipmi_sim::PASSWORD
        ),
    )
    .expect("write the BMC credentials");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .expect("set the credentials' mode");
    path.to_path_buf()
}
