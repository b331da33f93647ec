//! GPU energy and power through NVML (via `nvml-wrapper`).
//!
//! Per GPU, at start, ergond probes what the driver offers:
//! * the energy counter (`NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION`, mJ since driver load, Volta+),
//! * instantaneous power (`NVML_FI_DEV_POWER_INSTANT`, mW, all architectures; `power_usage()`
//!   is the fallback, averaged over 1 s on Ampere+),
//!
//! preferring one `nvmlDeviceGetFieldValues` call for both (one driver round trip, each entry
//! with its own return code) and falling back to the separate functions when the field-values
//! call or a field is unavailable. Energy comes from the counter when it exists; otherwise power
//! is integrated and the GPU's method says so ([`Method::IntegratedPower`]). A GPU with neither
//! is reported as unsupported, never as 0 W.
//!
//! A GPU that falls off the bus (`GPU_IS_LOST`) is marked lost and skipped from then on; the
//! others keep being read.

use crate::clock::monotonic_ns;
use crate::counter::{
    CounterKind, CounterSpec, EnergyCounter, EnergyTotals, Method, PowerIntegrator, RawReading,
    Step, Support,
};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN,
    NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN,
    NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP,
    NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN, NVML_FI_DEV_POWER_INSTANT,
    NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
};
use nvml_wrapper::{Device, Nvml};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Error from the GPU source. Each names the GPU (UUID) or library involved.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// NVML could not be loaded or initialised.
    #[error(
        "cannot initialise NVML from {library}: {source}. Install the NVIDIA driver (it ships \
         libnvidia-ml.so.1), or set `nvml_library` in ergond.toml to the library's path"
    )]
    Init {
        /// Library path tried (or the default name).
        library: String,
        /// Underlying error.
        source: NvmlError,
    },
    /// Listing or identifying devices failed.
    #[error("NVML could not {what}: {source}")]
    Enumerate {
        /// What was being done.
        what: String,
        /// Underlying error.
        source: NvmlError,
    },
    /// The GPU fell off the bus.
    #[error(
        "GPU {uuid} is lost (NVML_ERROR_GPU_IS_LOST): it fell off the bus or stopped responding; \
         its energy is no longer measured. Check `dmesg` for Xid errors; a node reboot or GPU \
         reset is usually needed"
    )]
    Lost {
        /// UUID of the lost GPU.
        uuid: String,
    },
    /// A read failed for another reason.
    #[error("reading {what} of GPU {uuid} failed: {source}")]
    Read {
        /// UUID.
        uuid: String,
        /// Which value.
        what: &'static str,
        /// Underlying error.
        source: NvmlError,
    },
}

/// How a GPU is identified. Slurm's gres files name `/dev/nvidiaN` (the minor number), tools
/// print the PCI bus id, NVML indices differ between processes with different
/// `CUDA_VISIBLE_DEVICES`: so all are kept, and the UUID is the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuIdentity {
    /// NVML index in this process.
    pub index: u32,
    /// `GPU-…` UUID: the stable key.
    pub uuid: String,
    /// PCI bus id, e.g. `00000000:17:00.0`, if the driver reports it.
    pub pci_bus_id: Option<String>,
    /// Minor number N of `/dev/nvidiaN`, if reported.
    pub minor: Option<u32>,
    /// Product name.
    pub name: Option<String>,
}

/// How one quantity is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadVia {
    /// As an entry of the single `nvmlDeviceGetFieldValues` call.
    FieldValue,
    /// Through its own function (`total_energy_consumption` / `power_usage`).
    Function,
    /// Not available on this GPU.
    Unsupported,
}

/// A GPU and what can be measured on it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    /// Identity.
    pub id: GpuIdentity,
    /// How the energy counter is read.
    pub energy_via: ReadVia,
    /// How instantaneous power is read.
    pub power_via: ReadVia,
    /// How energy is obtained: counter, integrated power, or unsupported (with why).
    pub method: Support<Method>,
    /// Whether the GPU has been reported lost.
    pub lost: bool,
    /// Its MIG instances, when it is in MIG mode (read once at start: a MIG change needs a
    /// restart of ergond, as it needs one of slurmd).
    pub mig: Option<MigLayout>,
}

/// The MIG instances of a GPU in MIG mode. NVML has no per-instance power or energy: the
/// board's counter is split among the instances' jobs by the attribution model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigLayout {
    /// Compute slices of the whole GPU (7 on A100/H100, 4 on A30): the largest GPU instance
    /// profile's slice count.
    pub total_slices: u32,
    /// The configured instances, in NVML's MIG device order.
    pub instances: Vec<MigInstanceInfo>,
}

/// One MIG device (a GPU instance with a compute instance).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigInstanceInfo {
    /// GPU instance id.
    pub gpu_instance_id: u32,
    /// Compute instance id within it.
    pub compute_instance_id: u32,
    /// Its GPU instance slices (3 for a `3g.40gb`).
    pub slices: u32,
    /// `MIG-…` UUID.
    pub uuid: String,
    /// Product name as NVML gives it (e.g. `NVIDIA H100 80GB HBM3 MIG 3g.40gb`).
    pub name: Option<String>,
}

/// One reading of a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuReading {
    /// Monotonic time (ns), the midpoint of the driver call(s).
    pub at_ns: u64,
    /// Monotonic time just before the driver call(s).
    pub before_ns: u64,
    /// Monotonic time just after the driver call(s).
    pub after_ns: u64,
    /// Energy counter, mJ since driver load (None when the GPU has no counter).
    pub energy_mj: Option<u64>,
    /// Instantaneous power, mW (None when unsupported).
    pub power_mw: Option<u32>,
}

/// How long each driver call of one [`GpuSource::read_timed`] took, in nanoseconds (`None`
/// when that call was not made). Used by `ergond probe` to report per-call latency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallTimes {
    /// The single `nvmlDeviceGetFieldValues` call (energy and/or power).
    pub field_values_ns: Option<u64>,
    /// `nvmlDeviceGetTotalEnergyConsumption` (fallback when the field is unavailable).
    pub energy_fn_ns: Option<u64>,
    /// `nvmlDeviceGetPowerUsage` (fallback when the field is unavailable).
    pub power_fn_ns: Option<u64>,
}

#[derive(Debug)]
struct GpuState {
    info: GpuInfo,
}

/// All GPUs of the node.
pub struct GpuSource {
    /// NVML and its devices' handles, in NVML index order (as `gpus`).
    driver: raw::Driver,
    gpus: Vec<GpuState>,
}

impl std::fmt::Debug for GpuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuSource")
            .field("gpus", &self.gpus)
            .finish()
    }
}

const FIELDS: [FieldId; 2] = [
    FieldId(NVML_FI_DEV_POWER_INSTANT),
    FieldId(NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION),
];

fn sample_u64(v: &SampleValue) -> Option<u64> {
    match *v {
        SampleValue::U64(x) => Some(x),
        SampleValue::U32(x) => Some(u64::from(x)),
        SampleValue::I64(x) => u64::try_from(x).ok(),
        SampleValue::F64(x) if x >= 0.0 => Some(x as u64),
        SampleValue::F64(_) => None,
    }
}

/// Load NVML (from `library`, or the driver's default `libnvidia-ml.so.1`) and count its GPUs.
fn init_nvml(library: Option<&Path>) -> Result<(Nvml, u32), GpuError> {
    let lib_name = library
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "libnvidia-ml.so.1".to_string());
    let nvml = match library {
        Some(p) => Nvml::builder().lib_path(p.as_os_str()).init(),
        None => Nvml::init(),
    }
    .map_err(|source| GpuError::Init {
        library: lib_name,
        source,
    })?;
    let count = nvml.device_count().map_err(|source| GpuError::Enumerate {
        what: "count devices".into(),
        source,
    })?;
    Ok((nvml, count))
}

impl GpuSource {
    /// Load NVML (from `library`, or the driver's default `libnvidia-ml.so.1`), enumerate the
    /// GPUs and probe each one's energy and power support.
    pub fn open(library: Option<&Path>) -> Result<Self, GpuError> {
        let (nvml, count) = init_nvml(library)?;
        let driver =
            raw::Driver::new(nvml, count).map_err(|(index, source)| GpuError::Enumerate {
                what: format!("get device {index}"),
                source,
            })?;
        let mut gpus = Vec::with_capacity(count as usize);
        for (index, dev) in (0..count).zip(driver.devices()) {
            let uuid = dev.uuid().map_err(|source| GpuError::Enumerate {
                what: format!("read the UUID of device {index}"),
                source,
            })?;
            let id = GpuIdentity {
                index,
                uuid,
                pci_bus_id: dev.pci_info().ok().map(|p| p.bus_id),
                minor: dev.minor_number().ok(),
                name: dev.name().ok(),
            };
            let mut info = probe(&dev, id);
            info.mig = mig_layout(&dev);
            tracing::info!(
                uuid = %info.id.uuid,
                minor = ?info.id.minor,
                energy = ?info.energy_via,
                power = ?info.power_via,
                method = ?info.method,
                mig_instances = info.mig.as_ref().map(|m| m.instances.len()),
                "GPU found"
            );
            gpus.push(GpuState { info });
        }
        Ok(Self { driver, gpus })
    }

    /// The GPUs, in NVML index order.
    pub fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.iter().map(|g| g.info.clone()).collect()
    }

    /// Number of GPUs.
    pub fn len(&self) -> usize {
        self.gpus.len()
    }

    /// Whether the node has no GPU.
    pub fn is_empty(&self) -> bool {
        self.gpus.is_empty()
    }

    /// Info of GPU `i`.
    pub fn info(&self, i: usize) -> &GpuInfo {
        &self.gpus[i].info
    }

    /// Version of the loaded NVML library (e.g. `12.550.54.15`).
    pub fn nvml_version(&self) -> Result<String, NvmlError> {
        self.driver.nvml().sys_nvml_version()
    }

    /// Version of the NVIDIA driver (e.g. `550.54.15`).
    pub fn driver_version(&self) -> Result<String, NvmlError> {
        self.driver.nvml().sys_driver_version()
    }

    /// Read GPU `i`'s energy counter and power in as few driver calls as possible.
    pub fn read(&mut self, i: usize) -> Result<GpuReading, GpuError> {
        self.read_timed(i, &mut CallTimes::default())
    }

    /// [`Self::read`], also recording how long each driver call took into `times` (reset
    /// first).
    pub fn read_timed(&mut self, i: usize, times: &mut CallTimes) -> Result<GpuReading, GpuError> {
        *times = CallTimes::default();
        let Self { driver, gpus } = self;
        let g = &mut gpus[i];
        if g.info.lost {
            return Err(GpuError::Lost {
                uuid: g.info.id.uuid.clone(),
            });
        }
        let dev = driver.device(i);
        let before_ns = monotonic_ns();
        let result = read_device(&dev, &g.info, times);
        let after_ns = monotonic_ns();
        match result {
            Ok((energy_mj, power_mw)) => Ok(GpuReading {
                at_ns: reading_instant(before_ns, after_ns),
                before_ns,
                after_ns,
                energy_mj,
                power_mw,
            }),
            Err((_, NvmlError::GpuLost)) => {
                g.info.lost = true;
                tracing::error!(uuid = %g.info.id.uuid, "GPU lost; continuing with the others");
                Err(GpuError::Lost {
                    uuid: g.info.id.uuid.clone(),
                })
            }
            Err((what, source)) => Err(GpuError::Read {
                uuid: g.info.id.uuid.clone(),
                what,
                source,
            }),
        }
    }

    /// Only the driver calls that reading GPU `i` makes (as [`Self::read`] chooses them), and
    /// nothing else: no clock read, no bookkeeping. `scripts/bench sampler` runs a loop of
    /// these at the sampler's deadlines as the floor of any sampler making the same calls, to
    /// measure what ergond's GPU thread adds. Whether every call succeeded.
    pub fn driver_calls_only(&self, i: usize) -> bool {
        let info = &self.gpus[i].info;
        let dev = self.driver.device(i);
        let mut ok = true;
        if info.energy_via == ReadVia::FieldValue || info.power_via == ReadVia::FieldValue {
            ok &= raw::field_values(&dev, FIELDS).is_ok_and(|v| v.iter().all(Result::is_ok));
        }
        if info.energy_via == ReadVia::Function {
            ok &= dev.total_energy_consumption().is_ok();
        }
        if info.power_via == ReadVia::Function {
            ok &= dev.power_usage().is_ok();
        }
        ok
    }

    /// The processes using GPU `i` and their SM utilisation (%) in the driver's latest sample
    /// window (`nvmlDeviceGetProcessUtilization`): `(pid, sm %)`, one entry per pid (the
    /// highest if several samples name it). Empty when no process ran; `None` when the GPU or
    /// driver does not report it (then shared GPUs are split equally).
    pub fn process_utilization(&mut self, i: usize) -> Option<Vec<(u32, u32)>> {
        if self.gpus[i].info.lost {
            return None;
        }
        let dev = self.driver.device(i);
        // Samples of the last second (the driver keeps a short history).
        let since_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
            .saturating_sub(1_000_000);
        match dev.process_utilization_stats(since_us) {
            Ok(samples) => {
                let mut out: Vec<(u32, u32)> = Vec::with_capacity(samples.len());
                for s in samples {
                    match out.iter_mut().find(|(p, _)| *p == s.pid) {
                        Some(e) => e.1 = e.1.max(s.sm_util),
                        None => out.push((s.pid, s.sm_util)),
                    }
                }
                Some(out)
            }
            Err(NvmlError::NotFound) => Some(Vec::new()),
            Err(_) => None,
        }
    }

    /// Find how often GPU `i`'s energy counter (or, without one, its power reading) changes:
    /// poll quickly for up to `budget` or until `max_changes` changes, and take the median
    /// interval between two changes ([`update_period_from_intervals`]). `None` when fewer than
    /// two changes were seen (constant power without a counter, or a budget too short).
    pub fn detect_update_period(
        &mut self,
        i: usize,
        budget: Duration,
        max_changes: usize,
    ) -> Result<Option<Duration>, GpuError> {
        let deadline = monotonic_ns() + budget.as_nanos() as u64;
        let mut last_value: Option<u64> = None;
        let mut change_times = Vec::new();
        while monotonic_ns() < deadline && change_times.len() < max_changes + 1 {
            let r = self.read(i)?;
            let v = r.energy_mj.or(r.power_mw.map(u64::from));
            if v.is_some() && last_value.is_some() && v != last_value {
                change_times.push(r.at_ns);
            }
            last_value = v;
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(update_period_from_intervals(
            change_times.windows(2).map(|w| w[1] - w[0]),
        ))
    }
}

/// A counter's update period from the intervals (ns) between the changes a poller saw: their
/// median. zeus takes the shortest, but a poll that runs late sees one change late, which makes
/// one interval too long and the next one too short by the delay; the shortest then
/// underestimates the period (7.5 ms seen for a 10 ms counter on a loaded machine), while the
/// median is unaffected by a minority of late polls. `None` without any interval.
pub fn update_period_from_intervals(intervals: impl Iterator<Item = u64>) -> Option<Duration> {
    let mut v: Vec<u64> = intervals.collect();
    if v.is_empty() {
        return None;
    }
    let mid = (v.len() - 1) / 2;
    let (_, median, _) = v.select_nth_unstable(mid);
    Some(Duration::from_nanos(*median))
}

type ReadFailure = (&'static str, NvmlError);

/// Run `f`, storing its duration (ns) into `slot`.
fn timed<T>(slot: &mut Option<u64>, f: impl FnOnce() -> T) -> T {
    let t0 = monotonic_ns();
    let out = f();
    *slot = Some(monotonic_ns() - t0);
    out
}

// ours are outside that range, so [`field_values_raw`] can pass them through unchanged.
const _: () = assert!(
    NVML_FI_DEV_POWER_INSTANT < 251 && NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION < 251,
    "field ids in the renumbered range need nvml-wrapper's translation"
);

fn read_device(
    dev: &Device<'_>,
    info: &GpuInfo,
    times: &mut CallTimes,
) -> Result<(Option<u64>, Option<u32>), ReadFailure> {
    let mut energy = None;
    let mut power = None;
    if info.energy_via == ReadVia::FieldValue || info.power_via == ReadVia::FieldValue {
        let values = timed(&mut times.field_values_ns, || {
            raw::field_values(dev, FIELDS)
        })
        .map_err(|e| ("field values", e))?;
        for (k, entry) in values.into_iter().enumerate() {
            let wanted = if k == 0 {
                info.power_via
            } else {
                info.energy_via
            };
            if wanted != ReadVia::FieldValue {
                continue;
            }
            let what = if k == 0 {
                "POWER_INSTANT"
            } else {
                "TOTAL_ENERGY_CONSUMPTION"
            };
            let v = entry.map_err(|e| (what, e))?;
            if k == 0 {
                power = Some(u32::try_from(v).unwrap_or(u32::MAX));
            } else {
                energy = Some(v);
            }
        }
    }
    if info.energy_via == ReadVia::Function {
        energy = Some(
            timed(&mut times.energy_fn_ns, || dev.total_energy_consumption())
                .map_err(|e| ("total energy consumption", e))?,
        );
    }
    if info.power_via == ReadVia::Function {
        power = Some(
            timed(&mut times.power_fn_ns, || dev.power_usage()).map_err(|e| ("power usage", e))?,
        );
    }
    Ok((energy, power))
}

/// Decide how to read a GPU's energy and power (see the module docs).
fn probe(dev: &Device<'_>, id: GpuIdentity) -> GpuInfo {
    let mut energy_via = ReadVia::Unsupported;
    let mut power_via = ReadVia::Unsupported;
    match dev.field_values_for(&FIELDS) {
        Ok(values) => {
            for (k, entry) in values.iter().enumerate() {
                let ok = matches!(entry, Ok(s) if s.value.as_ref().is_ok_and(|v| sample_u64(v).is_some()));
                if ok {
                    if k == 0 {
                        power_via = ReadVia::FieldValue;
                    } else {
                        energy_via = ReadVia::FieldValue;
                    }
                }
            }
        }
        Err(e) => {
            tracing::debug!(uuid = %id.uuid, error = %e, "field values unavailable; using separate calls")
        }
    }
    if energy_via == ReadVia::Unsupported && dev.total_energy_consumption().is_ok() {
        energy_via = ReadVia::Function;
    }
    if power_via == ReadVia::Unsupported && dev.power_usage().is_ok() {
        power_via = ReadVia::Function;
    }
    let method = if energy_via != ReadVia::Unsupported {
        Support::Supported(Method::Counter)
    } else if power_via != ReadVia::Unsupported {
        Support::Supported(Method::IntegratedPower)
    } else {
        Support::Unsupported(
            "the driver reports neither an energy counter nor power for this GPU".into(),
        )
    };
    GpuInfo {
        id,
        energy_via,
        power_via,
        method,
        lost: false,
        mig: None,
    }
}

/// The GPU's MIG instances if it is in MIG mode (`None` otherwise, or when the driver does not
/// say). Instances whose ids or slice count cannot be read are left out with a warning: their
/// slices then count as unused, so their share stays unattributed rather than going to others.
fn mig_layout(dev: &Device<'_>) -> Option<MigLayout> {
    let mode = dev.mig_mode().ok()?;
    if mode.current != 1 {
        return None;
    }
    let max = dev.mig_device_count().unwrap_or(0);
    let parent = dev.uuid().unwrap_or_default();
    let mut instances = Vec::new();
    for i in 0..max {
        let mig = match dev.mig_device_by_index(i) {
            Ok(m) => m,
            Err(NvmlError::NotFound) => continue,
            Err(e) => {
                tracing::warn!(gpu = %parent, slot = i, error = %e, "MIG device unreadable; left out");
                continue;
            }
        };
        let ids = (
            raw::instance_id(&mig, raw::Instance::Gpu),
            raw::instance_id(&mig, raw::Instance::Compute),
        );
        let slices = mig.attributes().map(|a| a.gpu_instance_slice_count);
        match (ids, slices, mig.uuid()) {
            ((Ok(gi), Ok(ci)), Ok(slices), Ok(uuid)) if slices > 0 => {
                instances.push(MigInstanceInfo {
                    gpu_instance_id: gi,
                    compute_instance_id: ci,
                    slices,
                    uuid,
                    name: mig.name().ok(),
                })
            }
            (ids, slices, uuid) => tracing::warn!(
                gpu = %parent, slot = i, ?ids, ?slices, ?uuid,
                "MIG device without ids or slice count; left out (its slices count as unused)"
            ),
        }
    }
    let total_slices = raw::total_slices(dev)
        .unwrap_or(max)
        .max(instances.iter().map(|m| m.slices).sum());
    if total_slices == 0 {
        return None;
    }
    Some(MigLayout {
        total_slices,
        instances,
    })
}

/// Sampling period for a GPU: half the detected counter update period (so every update is
/// seen), clamped to `[min, max]`; `default` when nothing was detected.
pub fn sampling_period(
    detected: Option<Duration>,
    min: Duration,
    max: Duration,
    default: Duration,
) -> Duration {
    match detected {
        Some(d) => (d / 2).clamp(min, max),
        None => default.clamp(min, max),
    }
}

/// Turns a GPU's readings into energy with the GPU's method: counter deltas when it has a
/// counter, trapezoidal power integration otherwise.
#[derive(Debug, Clone)]
pub struct GpuEnergyMeter {
    counter: Option<EnergyCounter>,
    integrator: PowerIntegrator,
    totals: EnergyTotals,
}

impl GpuEnergyMeter {
    /// A meter for a GPU measured with `method`. `max_power_w` bounds plausible deltas (use
    /// well above the board's power limit); `update_period` is the detected counter period.
    pub fn new(method: Method, max_power_w: f64, update_period: Duration) -> Self {
        let counter = (method == Method::Counter).then(|| {
            EnergyCounter::new(CounterSpec {
                kind: CounterKind::Resetting,
                joules_per_unit: 1e-3,
                max_power_w,
                margin: 1.5,
                staleness_ns: update_period.as_nanos() as u64,
            })
        });
        Self {
            counter,
            integrator: PowerIntegrator::new(),
            totals: EnergyTotals::new(method),
        }
    }

    /// Feed one reading; returns the step for this interval (also added to the totals).
    /// A reading that lacks the needed value is a gap: the baseline is kept for counters (the
    /// next delta spans the gap exactly) and reset for integration (never integrate blind).
    pub fn update(&mut self, r: &GpuReading) -> Option<Step> {
        let step = match (&mut self.counter, r.energy_mj, r.power_mw) {
            (Some(c), Some(e), _) => c.update(RawReading {
                at_ns: r.at_ns,
                value: e,
            }),
            (None, _, Some(p)) => self.integrator.update(r.at_ns, f64::from(p) / 1000.0),
            (None, _, None) => {
                self.integrator.clear();
                return None;
            }
            (Some(_), None, _) => return None,
        };
        self.totals.add(&step);
        Some(step)
    }

    /// Accumulated totals.
    pub fn totals(&self) -> &EnergyTotals {
        &self.totals
    }
}

/// The clock-event (throttle) reasons whose cumulative time NVML counts, in the order of
/// [`GpuStatsSample::throttle_ns`]: name (as the manifest and `/metrics` spell it) and field id
/// (`NVML_FI_DEV_CLOCKS_EVENT_REASON_*`, nanoseconds since the driver loaded). nvml-wrapper
/// translates the ids a CUDA 13.0 Update 1 driver renumbered.
pub const THROTTLE_REASONS: [(&str, u32); 4] = [
    ("power_cap", NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP),
    (
        "sw_thermal",
        NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN,
    ),
    (
        "hw_thermal",
        NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN,
    ),
    (
        "hw_power_brake",
        NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN,
    ),
];

/// One reading of a GPU's activity and health (the efficiency statistics): each value `None`
/// where the GPU or driver does not report it, or the read failed this time (never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuStatsSample {
    /// Monotonic time (ns) after the reads.
    pub at_ns: u64,
    /// SM (GPU) utilisation over the driver's last sample period, % (`nvmlDeviceGetUtilizationRates`).
    pub util_pct: Option<u32>,
    /// Device memory in use, bytes (`nvmlDeviceGetMemoryInfo_v2`).
    pub memory_used_bytes: Option<u64>,
    /// GPU die temperature, °C.
    pub temperature_c: Option<u32>,
    /// SM clock, MHz.
    pub sm_clock_mhz: Option<u32>,
    /// Memory clock, MHz.
    pub mem_clock_mhz: Option<u32>,
    /// Cumulative time throttled per reason of [`THROTTLE_REASONS`], ns since the driver loaded.
    pub throttle_ns: [Option<u64>; 4],
    /// Cumulative corrected ECC errors (volatile: since the driver loaded).
    pub ecc_corrected: Option<u64>,
    /// Cumulative uncorrected ECC errors (volatile).
    pub ecc_uncorrected: Option<u64>,
}

/// Which statistics a GPU reports: probed once at open; a query the GPU refuses then is never
/// made again (it stays "not reported").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct StatsSupport {
    util: bool,
    memory: bool,
    temperature: bool,
    sm_clock: bool,
    mem_clock: bool,
    throttle: [bool; 4],
    ecc: bool,
    xid: bool,
}

/// The GPUs' activity and health statistics, read at the CPU-time cadence on a thread of their
/// own (`ergond-gpustat`), never in the energy sampler's loop. Has its own NVML handle (NVML
/// counts initialisations) so that the energy thread's driver calls are not shared.
pub struct GpuStatsReader {
    driver: raw::Driver,
    support: Vec<StatsSupport>,
    uuids: Vec<String>,
}

impl std::fmt::Debug for GpuStatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStatsReader")
            .field("uuids", &self.uuids)
            .field("support", &self.support)
            .finish()
    }
}

/// A value of a query that succeeded; `None` for one that did not (logged once at open).
fn stat<T>(r: Result<T, NvmlError>) -> Option<T> {
    r.ok()
}

impl GpuStatsReader {
    /// Load NVML (as [`GpuSource::open`]) and find the GPUs `uuids` (the energy source's, in
    /// its order: position `i` here is position `i` there); probe what each reports.
    pub fn open(library: Option<&Path>, uuids: &[String]) -> Result<Self, GpuError> {
        let (nvml, count) = init_nvml(library)?;
        let mut order = Vec::with_capacity(uuids.len());
        for want in uuids {
            let index = (0..count)
                .find(|&i| {
                    nvml.device_by_index(i)
                        .and_then(|d| d.uuid())
                        .is_ok_and(|u| &u == want)
                })
                .ok_or_else(|| GpuError::Enumerate {
                    what: format!("find GPU {want} again for its statistics"),
                    source: NvmlError::NotFound,
                })?;
            order.push(index);
        }
        let driver = raw::Driver::with_indices(nvml, &order).map_err(|(index, source)| {
            GpuError::Enumerate {
                what: format!("get device {index}"),
                source,
            }
        })?;
        let support = driver
            .devices()
            .map(|dev| {
                let throttle = match dev.field_values_for(&THROTTLE_REASONS.map(|(_, id)| FieldId(id))) {
                    Ok(v) => {
                        let mut t = [false; 4];
                        for (k, e) in v.iter().enumerate().take(4) {
                            t[k] = matches!(e, Ok(s) if s.value.as_ref().is_ok_and(|v| sample_u64(v).is_some()));
                        }
                        t
                    }
                    Err(_) => [false; 4],
                };
                StatsSupport {
                    util: dev.utilization_rates().is_ok(),
                    memory: dev.memory_info().is_ok(),
                    temperature: dev.temperature(TemperatureSensor::Gpu).is_ok(),
                    sm_clock: dev.clock_info(Clock::SM).is_ok(),
                    mem_clock: dev.clock_info(Clock::Memory).is_ok(),
                    throttle,
                    ecc: dev
                        .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
                        .is_ok(),
                    // Each tried in a set of its own: a failed registration frees its set.
                    xid: driver
                        .nvml()
                        .create_event_set()
                        .map_err(Into::into)
                        .and_then(|s| register_xid(&dev, s))
                        .is_ok(),
                }
            })
            .collect::<Vec<_>>();
        for (uuid, s) in uuids.iter().zip(&support) {
            tracing::info!(%uuid, support = ?s, "GPU statistics available");
        }
        Ok(Self {
            driver,
            support,
            uuids: uuids.to_vec(),
        })
    }

    /// Number of GPUs.
    pub fn len(&self) -> usize {
        self.support.len()
    }

    /// The statistics GPU `i` reports and those it does not, by name (`ergond check`).
    pub fn reported(&self, i: usize) -> (Vec<&'static str>, Vec<&'static str>) {
        let s = self.support[i];
        let mut all = vec![
            ("SM utilisation", s.util),
            ("memory used", s.memory),
            ("temperature", s.temperature),
            ("SM clock", s.sm_clock),
            ("memory clock", s.mem_clock),
        ];
        for (k, (name, _)) in THROTTLE_REASONS.iter().enumerate() {
            all.push((
                match *name {
                    "power_cap" => "throttle power_cap",
                    "sw_thermal" => "throttle sw_thermal",
                    "hw_thermal" => "throttle hw_thermal",
                    _ => "throttle hw_power_brake",
                },
                s.throttle[k],
            ));
        }
        all.extend([("ECC errors", s.ecc), ("Xid events", s.xid)]);
        let yes = all.iter().filter(|(_, b)| *b).map(|(n, _)| *n).collect();
        let no = all.iter().filter(|(_, b)| !*b).map(|(n, _)| *n).collect();
        (yes, no)
    }

    /// Whether no GPU reports any statistic or Xid event (then there is nothing to sample).
    pub fn reports_nothing(&self) -> bool {
        self.support.iter().all(|s| *s == StatsSupport::default())
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.support.is_empty()
    }

    /// Read GPU `i`'s statistics (only the queries it supports).
    pub fn sample(&self, i: usize) -> GpuStatsSample {
        let s = self.support[i];
        let dev = self.driver.device(i);
        let mut out = GpuStatsSample::default();
        if s.util {
            out.util_pct = stat(dev.utilization_rates()).map(|u| u.gpu.min(100));
        }
        if s.memory {
            out.memory_used_bytes = stat(dev.memory_info()).map(|m| m.used);
        }
        if s.temperature {
            out.temperature_c = stat(dev.temperature(TemperatureSensor::Gpu));
        }
        if s.sm_clock {
            out.sm_clock_mhz = stat(dev.clock_info(Clock::SM));
        }
        if s.mem_clock {
            out.mem_clock_mhz = stat(dev.clock_info(Clock::Memory));
        }
        if s.throttle.iter().any(|&b| b) {
            if let Ok(v) = dev.field_values_for(&THROTTLE_REASONS.map(|(_, id)| FieldId(id))) {
                for (k, e) in v.iter().enumerate().take(4) {
                    if s.throttle[k] {
                        out.throttle_ns[k] = e
                            .as_ref()
                            .ok()
                            .and_then(|s| s.value.as_ref().ok())
                            .and_then(sample_u64);
                    }
                }
            }
        }
        if s.ecc {
            out.ecc_corrected =
                stat(dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile));
            out.ecc_uncorrected =
                stat(dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile));
        }
        out.at_ns = monotonic_ns();
        out
    }

    /// An event set with every GPU that reports Xid critical errors registered
    /// (`nvmlDeviceRegisterEvents`); the others are "not reported".
    pub fn xid_watch(&self) -> XidWatch<'_> {
        let mut supported: Vec<bool> = self.support.iter().map(|s| s.xid).collect();
        let mut set = supported
            .iter()
            .any(|&b| b)
            .then(|| self.driver.nvml().create_event_set().ok())
            .flatten();
        for (i, dev) in self.driver.devices().enumerate() {
            if supported[i] {
                set = set.and_then(|s| register_xid(&dev, s).ok());
            }
        }
        if set.is_none() {
            supported.iter_mut().for_each(|b| *b = false);
        }
        XidWatch {
            set,
            supported,
            uuids: &self.uuids,
        }
    }
}

/// Register `dev` for Xid critical errors in `set` (which NVML frees on failure).
fn register_xid<'n>(
    dev: &Device<'n>,
    set: nvml_wrapper::event::EventSet<'n>,
) -> Result<nvml_wrapper::event::EventSet<'n>, nvml_wrapper::error::NvmlErrorWithSource> {
    dev.register_events(EventTypes::CRITICAL_XID_ERROR, set)
}

/// The Xid events of the GPUs that report them, polled without blocking.
pub struct XidWatch<'a> {
    set: Option<nvml_wrapper::event::EventSet<'a>>,
    /// Per GPU position: whether its Xid events are watched.
    pub supported: Vec<bool>,
    uuids: &'a [String],
}

impl XidWatch<'_> {
    /// The events that arrived since the last call, `(GPU position, Xid)` (at most `max`),
    /// without waiting.
    pub fn drain(&self, max: usize, out: &mut Vec<(usize, u64)>) {
        out.clear();
        let Some(set) = &self.set else { return };
        while out.len() < max {
            match set.wait(0) {
                Ok(ev) => {
                    let Some(XidError::Value(xid)) = ev.event_data else {
                        continue;
                    };
                    let uuid = ev.device.uuid().ok();
                    if let Some(pos) = self.uuids.iter().position(|u| Some(u) == uuid.as_ref()) {
                        out.push((pos, xid));
                    }
                }
                Err(_) => break,
            }
        }
    }
}

/// The default NVML library name, for messages.
pub fn default_library() -> PathBuf {
    PathBuf::from("libnvidia-ml.so.1")
}

/// A driver call slower than this is a blocked one, not a slow one.
pub const BLOCKED_READ_NS: u64 = 50_000_000;

/// The instant a reading taken between `before_ns` and `after_ns` is stamped with: the
/// midpoint of a normal call (microseconds, so at most half of that off), but the end of a
/// call that blocked (a hung driver): the value it returns is then from when it returned, not
/// from when it was asked, and stamping it at the midpoint would put energy seconds early.
pub fn reading_instant(before_ns: u64, after_ns: u64) -> u64 {
    let took = after_ns.saturating_sub(before_ns);
    if took > BLOCKED_READ_NS {
        after_ns
    } else {
        before_ns + took / 2
    }
}

/// NVML's raw device handles, and the driver calls nvml-wrapper does not wrap (or wraps with
/// allocations the sampler's per-tick path avoids): the only unsafe code of ergond outside
/// `crate::sys`.
///
/// nvml-wrapper hands out a `Device<'nvml>` that borrows its `Nvml`; the sampler instead keeps
/// every device's handle next to the `Nvml` that owns it ([`Driver`]), so a `Device` is made
/// again for each read without an NVML call, and is only ever made against that same `Nvml`.
/// The other calls take a `Device`, whose handle and library belong together by construction.
#[allow(unsafe_code)]
mod raw {
    use super::{sample_u64, FieldId};
    use nvml_wrapper::enums::device::SampleValue;
    use nvml_wrapper::error::{nvml_sym, nvml_try, NvmlError};
    use nvml_wrapper::{Device, Nvml};
    use nvml_wrapper_sys::bindings::{
        nvmlDevice_t, nvmlFieldValue_t, nvmlGpuInstanceProfileInfo_t,
        nvmlValueType_enum_NVML_VALUE_TYPE_DOUBLE as VT_DOUBLE,
        nvmlValueType_enum_NVML_VALUE_TYPE_SIGNED_LONG_LONG as VT_I64,
        nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT as VT_U32,
        nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG as VT_ULONG,
        nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG as VT_U64,
        NVML_GPU_INSTANCE_PROFILE_COUNT,
    };

    /// A device handle. `nvmlDevice_t` is an opaque token that NVML allows from any thread;
    /// nvml-wrapper's own `Device` is `Send + Sync` for the same reason.
    #[derive(Debug, Clone, Copy)]
    struct Handle(nvmlDevice_t);
    // SAFETY: see the type's documentation: the handle is never dereferenced by us.
    unsafe impl Send for Handle {}
    // SAFETY: as above.
    unsafe impl Sync for Handle {}

    /// NVML with the handles of its devices, in NVML index order.
    pub(super) struct Driver {
        nvml: Nvml,
        handles: Vec<Handle>,
    }

    impl Driver {
        /// Keep the handles of devices `0..count` of `nvml`; the index and error of the first
        /// device NVML does not give.
        pub(super) fn new(nvml: Nvml, count: u32) -> Result<Self, (u32, NvmlError)> {
            let handles = (0..count)
                .map(|index| {
                    let dev = nvml.device_by_index(index).map_err(|e| (index, e))?;
                    // SAFETY: reading the token out of a live Device of `nvml`; it is only used
                    // again through `device`, against this same `nvml`, which owns it.
                    Ok(Handle(unsafe { dev.handle() }))
                })
                .collect::<Result<_, _>>()?;
            Ok(Self { nvml, handles })
        }

        /// Keep the handles of devices `indices` of `nvml`, in that order.
        pub(super) fn with_indices(nvml: Nvml, indices: &[u32]) -> Result<Self, (u32, NvmlError)> {
            let handles = indices
                .iter()
                .map(|&index| {
                    let dev = nvml.device_by_index(index).map_err(|e| (index, e))?;
                    // SAFETY: as in `new`.
                    Ok(Handle(unsafe { dev.handle() }))
                })
                .collect::<Result<_, _>>()?;
            Ok(Self { nvml, handles })
        }

        /// The NVML instance.
        pub(super) fn nvml(&self) -> &Nvml {
            &self.nvml
        }

        /// Device `i` (NVML index).
        pub(super) fn device(&self, i: usize) -> Device<'_> {
            // SAFETY: the handle came from `self.nvml` (see `new`), which outlives the Device.
            unsafe { Device::new(self.handles[i].0, &self.nvml) }
        }

        /// Every device, in NVML index order.
        pub(super) fn devices(&self) -> impl Iterator<Item = Device<'_>> {
            (0..self.handles.len()).map(|i| self.device(i))
        }
    }

    // Field ids 251..=273 were renumbered in CUDA 13.0 Update 1 (nvml-wrapper translates them);
    // ours must be outside that range, so [`field_values`] can pass them through unchanged.
    const _: () = assert!(
        super::NVML_FI_DEV_POWER_INSTANT < 251 && super::NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION < 251,
        "field ids in the renumbered range need nvml-wrapper's translation"
    );

    /// One `nvmlDeviceGetFieldValues` call for `fields`, into an array on the stack: the same
    /// call and decoding as `Device::field_values_for`, without its two heap allocations per
    /// call, so the sampler's per-tick path allocates nothing. One result per field.
    pub(super) fn field_values<const N: usize>(
        dev: &Device<'_>,
        fields: [FieldId; N],
    ) -> Result<[Result<u64, NvmlError>; N], NvmlError> {
        let sym = nvml_sym(dev.nvml().lib().nvmlDeviceGetFieldValues.as_ref())?;
        // SAFETY: nvmlFieldValue_t is plain integers and a union of integers: all-zero is valid.
        let mut raw: [nvmlFieldValue_t; N] = unsafe { std::mem::zeroed() };
        for (entry, id) in raw.iter_mut().zip(fields) {
            entry.fieldId = id.0;
        }
        // SAFETY: the Device's handle belongs to its library; `raw` holds N initialised entries.
        nvml_try(unsafe { sym(dev.handle(), N as i32, raw.as_mut_ptr()) })?;
        Ok(raw.map(|entry| {
            nvml_try(entry.nvmlReturn)?;
            // SAFETY: the union member read is the one `valueType` says the driver wrote.
            let value = unsafe {
                match entry.valueType {
                    VT_DOUBLE => SampleValue::F64(entry.value.dVal),
                    VT_U32 => SampleValue::U32(entry.value.uiVal),
                    // c_ulong is u64 here but u32 on 32-bit targets.
                    #[allow(clippy::useless_conversion)]
                    VT_ULONG => SampleValue::U64(u64::from(entry.value.ulVal)),
                    VT_U64 => SampleValue::U64(entry.value.ullVal),
                    VT_I64 => SampleValue::I64(entry.value.sllVal),
                    other => return Err(NvmlError::UnexpectedVariant(other)),
                }
            };
            sample_u64(&value).ok_or(NvmlError::UnexpectedVariant(entry.valueType))
        }))
    }

    /// Which id of a MIG device [`instance_id`] reads.
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Instance {
        /// `nvmlDeviceGetGpuInstanceId`.
        Gpu,
        /// `nvmlDeviceGetComputeInstanceId`.
        Compute,
    }

    /// The GPU or compute instance id of a MIG device: not wrapped by nvml-wrapper, called
    /// through its loaded library.
    pub(super) fn instance_id(mig: &Device<'_>, which: Instance) -> Result<u32, NvmlError> {
        let lib = mig.nvml().lib();
        let sym = match which {
            Instance::Gpu => nvml_sym(lib.nvmlDeviceGetGpuInstanceId.as_ref())?,
            Instance::Compute => nvml_sym(lib.nvmlDeviceGetComputeInstanceId.as_ref())?,
        };
        let mut id: std::ffi::c_uint = 0;
        // SAFETY: the Device's handle belongs to its library; `id` is a valid out-pointer.
        nvml_try(unsafe { sym(mig.handle(), &mut id) })?;
        Ok(id)
    }

    /// The largest slice count among the GPU instance profiles the GPU supports (its whole
    /// size).
    pub(super) fn total_slices(dev: &Device<'_>) -> Option<u32> {
        let sym = nvml_sym(
            dev.nvml()
                .lib()
                .nvmlDeviceGetGpuInstanceProfileInfo
                .as_ref(),
        )
        .ok()?;
        (0..NVML_GPU_INSTANCE_PROFILE_COUNT)
            .filter_map(|profile| {
                // SAFETY: plain integers; all-zero is a valid value.
                let mut info: nvmlGpuInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: the Device's handle belongs to its library; valid out-pointer.
                let rc = unsafe { sym(dev.handle(), profile, &mut info) };
                (rc == 0).then_some(info.sliceCount)
            })
            .max()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_blocked_read_is_stamped_when_it_returned() {
        assert_eq!(
            reading_instant(1_000, 3_000),
            2_000,
            "midpoint of a normal call"
        );
        let end = 1_000 + BLOCKED_READ_NS + 1;
        assert_eq!(reading_instant(1_000, end), end, "the end of a blocked one");
    }

    use super::*;

    #[test]
    fn update_period_is_the_median_interval_so_a_late_poll_does_not_shorten_it() {
        let ms = |v: u64| v * 1_000_000;
        // A 10 ms counter; the third change was seen 2.5 ms late.
        let seen = [ms(10), ms(10), ms(25) / 2, ms(15) / 2, ms(10)];
        assert_eq!(
            update_period_from_intervals(seen.into_iter()),
            Some(Duration::from_millis(10))
        );
        assert_eq!(update_period_from_intervals(std::iter::empty()), None);
        assert_eq!(
            update_period_from_intervals([ms(20)].into_iter()),
            Some(Duration::from_millis(20))
        );
    }

    #[test]
    fn sampling_period_is_half_the_update_period_clamped() {
        let ms = Duration::from_millis;
        assert_eq!(
            sampling_period(Some(ms(100)), ms(10), ms(200), ms(100)),
            ms(50)
        );
        assert_eq!(
            sampling_period(Some(ms(10)), ms(10), ms(200), ms(100)),
            ms(10)
        );
        assert_eq!(
            sampling_period(Some(ms(1000)), ms(10), ms(200), ms(100)),
            ms(200)
        );
        assert_eq!(sampling_period(None, ms(10), ms(200), ms(100)), ms(100));
    }

    #[test]
    fn meter_uses_counter_or_integrates() {
        let mut m = GpuEnergyMeter::new(Method::Counter, 1000.0, Duration::from_millis(100));
        let r = |t_ms: u64, e: Option<u64>, p: Option<u32>| GpuReading {
            at_ns: t_ms * 1_000_000,
            before_ns: t_ms * 1_000_000,
            after_ns: t_ms * 1_000_000,
            energy_mj: e,
            power_mw: p,
        };
        m.update(&r(0, Some(1_000), Some(300_000)));
        assert_eq!(m.update(&r(50, None, Some(300_000))), None);
        m.update(&r(100, Some(31_000), Some(300_000)));
        assert!((m.totals().joules - 30.0).abs() < 1e-9);

        let mut m = GpuEnergyMeter::new(Method::IntegratedPower, 1000.0, Duration::ZERO);
        m.update(&r(0, None, Some(100_000)));
        m.update(&r(100, None, Some(300_000)));
        assert!((m.totals().joules - 20.0).abs() < 1e-9);
        assert_eq!(m.totals().method, Method::IntegratedPower);
    }

    #[test]
    fn missing_library_error_names_it_and_the_setting() {
        let err = GpuSource::open(Some(Path::new("/nonexistent/libnvidia-ml.so.1"))).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/libnvidia-ml.so.1") && msg.contains("nvml_library"),
            "{msg}"
        );
    }
}
