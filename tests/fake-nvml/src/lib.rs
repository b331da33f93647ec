//! A fake `libnvidia-ml.so` for tests: exports the subset of the NVML C API that ergond uses
//! through the real `nvml-wrapper`, driven by a JSON scenario.
//!
//! # Scenario
//! Read at `nvmlInit*`. The library first looks for a file next to itself named
//! `<this library's path>.scenario.json` (so tests running in parallel can each copy the library
//! and give each copy its own scenario), then for the path in `FAKE_NVML_SCENARIO`.
//!
//! ```json
//! { "start_monotonic_ns": 12345, "time_scale": 1.0, "driver_version": "550.54.15",
//!   "gpus": [ { "uuid": "GPU-…", "name": "Fake H100", "minor": 0, "pci_bus_id": "00000000:17:00.0",
//!               "profile": {"kind": "square", "low_w": 80, "high_w": 400, "period_s": 0.5},
//!               "update_period_ms": 10, "initial_energy_mj": 1000,
//!               "unsupported": ["energy"], "reset_at_s": 1.0, "lost_at_s": 1.5,
//!               "read_delay_us": 25000,
//!               "processes": [ {"pid": 4242, "sm": 75}, {"pid": 4343, "sm": 25} ] } ] }
//! ```
//! Scenario time is `(CLOCK_MONOTONIC - start_monotonic_ns) × time_scale` seconds;
//! `start_monotonic_ns` defaults to the instant of the first successful init.
//! `unsupported` may name `energy` (energy counter → NOT_SUPPORTED), `power` (power usage and
//! the POWER_INSTANT field → NOT_SUPPORTED) and `field_values` (the whole field-values call →
//! NOT_SUPPORTED, as on old drivers).
//! `read_delay_us` (default 0) makes every reading call of that GPU (energy, power, field values)
//! take at least that long, like a driver call on a busy or throttled GPU; the delay is spent
//! outside the library's lock, so other GPUs are not slowed. Tests use it to make a sampler
//! overrun its period.
//!
//! `hang` (`{"at_s": 2.0, "for_s": 3.0}`, default none) makes the reading calls of that GPU
//! made within that stretch of scenario time block until it ends, like a driver call hanging
//! for seconds; they return the value at their return.
//!
//! `processes` (default none) are what `nvmlDeviceGetProcessUtilization` reports: each process
//! with its SM utilisation (%), constant; `unsupported` may name `process_utilization`.
//!
//! ## Activity, health and events
//! Each of these is optional per GPU; a GPU whose scenario omits one answers its query with
//! `NVML_ERROR_NOT_SUPPORTED`, as a GPU or driver without it does. A *scripted value* is a
//! number (constant) or a list of `[at_s, value]` steps (the value of the last step at or before
//! the scenario time; before the first step, the first value).
//!
//! ```json
//! "utilization": 35, "memory_used_bytes": [[0, 1e9], [1.0, 3e9]], "temperature_c": 60,
//! "sm_clock_mhz": 1410, "mem_clock_mhz": 1593,
//! "throttle": {"power_cap": 0.5, "hw_thermal": 0.25},
//! "ecc": {"corrected": [[0, 10], [1.0, 12]], "uncorrected": 0},
//! "xids": [{"at_s": 1.0, "xid": 79}]
//! ```
//! - `utilization` (scripted, %): `nvmlDeviceGetUtilizationRates`' GPU (SM) utilisation;
//!   memory utilisation is reported as 0.
//! - `memory_used_bytes` (scripted): `nvmlDeviceGetMemoryInfo_v2`'s `used` (`total` is
//!   `memory_total_bytes`, default 80 GiB; `free` the rest).
//! - `temperature_c` (scripted): `nvmlDeviceGetTemperature` (GPU sensor).
//! - `sm_clock_mhz`, `mem_clock_mhz` (scripted): `nvmlDeviceGetClockInfo` for `NVML_CLOCK_SM`
//!   (also answers `NVML_CLOCK_GRAPHICS`) and `NVML_CLOCK_MEM`.
//! - `throttle`: per reason, the fraction of time the clocks are held down (0–1, constant);
//!   served as the cumulative nanosecond counters of `nvmlDeviceGetFieldValues`
//!   `NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP` (`power_cap`), `…_SW_THERM_SLOWDOWN`
//!   (`sw_thermal`), `…_HW_THERM_SLOWDOWN` (`hw_thermal`) and `…_HW_POWER_BRAKE_SLOWDOWN`
//!   (`hw_power_brake`): `fraction × scenario time`. A reason not named answers NOT_SUPPORTED
//!   in its entry.
//! - `ecc` (`corrected`, `uncorrected`: scripted counts): `nvmlDeviceGetTotalEccErrors`, the
//!   same for the volatile and aggregate counters.
//! - `xids`: Xid critical errors, each delivered once per event set by
//!   `nvmlEventSetWait_v2` once the scenario time reaches `at_s`, to a set the GPU was
//!   registered in with `nvmlDeviceRegisterEvents` (`nvmlEventTypeXidCriticalError`). Without
//!   `xids`, registering the GPU answers NOT_SUPPORTED; with an empty list it succeeds and
//!   delivers nothing. A wait with nothing due sleeps until something is, or its timeout, and
//!   then answers `NVML_ERROR_TIMEOUT`.
//!
//! ## MIG (Multi-Instance GPU)
//! A GPU may carry a `mig` object, which puts it in MIG mode (current = pending = 1):
//!
//! ```json
//! "mig": { "total_slices": 7,
//!          "instances": [ {"gi": 1, "ci": 0, "slices": 3, "uuid": "MIG-1111…", "profile": "3g.40gb"},
//!                         {"gi": 2, "slices": 2, "uuid": "MIG-2222…"} ] }
//! ```
//! `ci` defaults to 0 and `profile` to `"<slices>g"`. Checked at load (a bad layout fails init
//! with `NVML_ERROR_DRIVER_NOT_LOADED`, like any invalid scenario): `1 <= total_slices <= 256`,
//! every `slices >= 1`, the slices sum to at most `total_slices` (the rest is free space), and
//! `gi` is unique within the GPU. `unsupported` may name `mig`: every MIG query below then
//! answers `NVML_ERROR_NOT_SUPPORTED` (a GPU without MIG capability, or a driver without MIG),
//! and a `mig` object is ignored. A GPU without `mig` (and MIG supported) is MIG-capable with
//! MIG disabled: mode 0/0, max MIG device count 0, no profiles.
//!
//! MIG device handles are tagged pointers `MIG_HANDLE_BASE + gpu_index × 256 + slot`, a range
//! disjoint from the GPU handles; `slot` is the instance's position in `instances`. The MIG
//! calls and what they answer:
//! - `nvmlDeviceGetMigMode(gpu)`: 1/1 in MIG mode, else 0/0.
//! - `nvmlDeviceGetMaxMigDeviceCount(gpu)`: `total_slices` in MIG mode, else 0.
//! - `nvmlDeviceGetMigDeviceHandleByIndex(gpu, i)`: the `i`-th instance; `NOT_FOUND` for an
//!   empty slot (`instances.len() <= i < total_slices`, as real NVML); `INVALID_ARGUMENT` past
//!   the max count.
//! - `nvmlDeviceIsMigDeviceHandle(any)`: 1 for a MIG handle, 0 for a GPU handle.
//! - `nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)`: the parent GPU's handle.
//! - `nvmlDeviceGetGpuInstanceId(mig)` / `nvmlDeviceGetComputeInstanceId(mig)`: `gi` / `ci`.
//! - `nvmlDeviceGetAttributes_v2(mig)`: GPU and compute instance slice count = `slices`,
//!   16 SMs and 10240 MB per slice, one shared copy engine, no shared decoders/encoders/JPEG/OFA;
//!   on a GPU handle `NOT_SUPPORTED`.
//! - `nvmlDeviceGetGpuInstanceProfileInfo(gpu, profile)`: for a GPU in MIG mode, the profiles
//!   `NVML_GPU_INSTANCE_PROFILE_{1,2,3,4,7,8,6}_SLICE` (ids 0–6) whose slice count is at most
//!   `total_slices` and is 1, 2, 3, 4 or exactly `total_slices` (so the largest supported
//!   profile is the whole GPU); `instanceCount = total_slices / sliceCount`, SMs and memory as
//!   for attributes. Other profiles, and a GPU not in MIG mode: `NOT_SUPPORTED`; an id
//!   `>= NVML_GPU_INSTANCE_PROFILE_COUNT`: `INVALID_ARGUMENT`.
//! - `nvmlDeviceGetUUID(mig)`: the instance's `uuid`; `nvmlDeviceGetName(mig)`:
//!   `"<GPU name> MIG <profile>"`.
//!
//! A MIG handle of a lost GPU answers `NVML_ERROR_GPU_IS_LOST`, like its parent. The reading
//! calls (energy, power, field values, process utilisation) answer `NOT_SUPPORTED` for a MIG
//! handle, as NVML has no per-instance power; every other GPU call (index, minor number, PCI
//! info, the MIG calls meant for a parent, profile info) answers `INVALID_ARGUMENT`. The parent
//! GPU keeps reporting the whole board's energy and power.
//!
//! Every exported function catches panics and returns `NVML_ERROR_UNKNOWN` instead of unwinding
//! into C.

#![allow(non_snake_case)]
// The exported functions are C entry points: their callers (NVML clients) uphold the C API's
// pointer contract, and each function null-checks what it dereferences.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod profile;

use nvml_wrapper_sys::bindings::{
    field_id, nvmlDeviceAttributes_t, nvmlDevice_st, nvmlDevice_t, nvmlEventData_t,
    nvmlEventSet_st, nvmlEventSet_t, nvmlEventTypeXidCriticalError, nvmlFieldValue_t,
    nvmlGpuInstanceProfileInfo_t, nvmlMemory_v2_t, nvmlPciInfo_t, nvmlProcessUtilizationSample_t,
    nvmlReturn_t, nvmlUtilization_t, nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT,
    nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, NVML_DEVICE_MIG_DISABLE,
    NVML_DEVICE_MIG_ENABLE, NVML_GPU_INSTANCE_PROFILE_1_SLICE, NVML_GPU_INSTANCE_PROFILE_2_SLICE,
    NVML_GPU_INSTANCE_PROFILE_3_SLICE, NVML_GPU_INSTANCE_PROFILE_4_SLICE,
    NVML_GPU_INSTANCE_PROFILE_6_SLICE, NVML_GPU_INSTANCE_PROFILE_7_SLICE,
    NVML_GPU_INSTANCE_PROFILE_8_SLICE, NVML_GPU_INSTANCE_PROFILE_COUNT,
};
use profile::{DeviceModel, Profile};
use serde::Deserialize;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

const SUCCESS: nvmlReturn_t = 0;
const ERROR_UNINITIALIZED: nvmlReturn_t = 1;
const ERROR_INVALID_ARGUMENT: nvmlReturn_t = 2;
const ERROR_NOT_SUPPORTED: nvmlReturn_t = 3;
const ERROR_NOT_FOUND: nvmlReturn_t = 6;
const ERROR_INSUFFICIENT_SIZE: nvmlReturn_t = 7;
const ERROR_DRIVER_NOT_LOADED: nvmlReturn_t = 9;
const ERROR_TIMEOUT: nvmlReturn_t = 10;
const ERROR_GPU_IS_LOST: nvmlReturn_t = 15;
const ERROR_UNKNOWN: nvmlReturn_t = 999;

/// Handles are tagged pointers `HANDLE_BASE + index`; nvml-wrapper never dereferences them.
const HANDLE_BASE: usize = 0x6_0000;
/// Event set handles are `EVENT_SET_BASE + index` (into [`State::event_sets`]).
const EVENT_SET_BASE: usize = 0x8_0000;
/// MIG device handles are `MIG_HANDLE_BASE + gpu_index * MIG_SLOTS + slot`; GPU handles stay
/// below this (a GPU index is only decoded from a handle under it).
const MIG_HANDLE_BASE: usize = 0x100_0000;
/// MIG handle slots per GPU: also the largest `total_slices` a scenario may give.
const MIG_SLOTS: usize = 256;
/// Per MIG slice: streaming multiprocessors and memory (MB), in attributes and profile info.
const SMS_PER_SLICE: u32 = 16;
const MB_PER_SLICE: u64 = 10_240;
/// GPU instance profiles the fake knows: (NVML profile id, slice count).
const GI_PROFILES: [(u32, u32); 7] = [
    (NVML_GPU_INSTANCE_PROFILE_1_SLICE, 1),
    (NVML_GPU_INSTANCE_PROFILE_2_SLICE, 2),
    (NVML_GPU_INSTANCE_PROFILE_3_SLICE, 3),
    (NVML_GPU_INSTANCE_PROFILE_4_SLICE, 4),
    (NVML_GPU_INSTANCE_PROFILE_7_SLICE, 7),
    (NVML_GPU_INSTANCE_PROFILE_8_SLICE, 8),
    (NVML_GPU_INSTANCE_PROFILE_6_SLICE, 6),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    #[serde(default)]
    start_monotonic_ns: Option<u64>,
    #[serde(default = "one")]
    time_scale: f64,
    #[serde(default = "default_driver")]
    driver_version: String,
    gpus: Vec<GpuScenario>,
}

fn one() -> f64 {
    1.0
}
fn default_driver() -> String {
    "550.54.15".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuScenario {
    uuid: String,
    #[serde(default = "default_name")]
    name: String,
    minor: u32,
    #[serde(default)]
    pci_bus_id: Option<String>,
    profile: Profile,
    #[serde(default = "default_period")]
    update_period_ms: f64,
    #[serde(default)]
    initial_energy_mj: u64,
    #[serde(default)]
    unsupported: Vec<String>,
    #[serde(default)]
    reset_at_s: Option<f64>,
    #[serde(default)]
    lost_at_s: Option<f64>,
    #[serde(default)]
    read_delay_us: u64,
    #[serde(default)]
    hang: Option<HangScenario>,
    #[serde(default)]
    processes: Vec<ProcessScenario>,
    #[serde(default)]
    mig: Option<MigScenario>,
    #[serde(default)]
    utilization: Option<Scripted>,
    #[serde(default)]
    memory_used_bytes: Option<Scripted>,
    #[serde(default = "default_memory_total")]
    memory_total_bytes: u64,
    #[serde(default)]
    temperature_c: Option<Scripted>,
    #[serde(default)]
    sm_clock_mhz: Option<Scripted>,
    #[serde(default)]
    mem_clock_mhz: Option<Scripted>,
    #[serde(default)]
    throttle: Option<ThrottleScenario>,
    #[serde(default)]
    ecc: Option<EccScenario>,
    #[serde(default)]
    xids: Option<Vec<XidScenario>>,
}

fn default_memory_total() -> u64 {
    80 << 30
}

/// A scripted value: a constant, or `[at_s, value]` steps (see the module docs).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum Scripted {
    Constant(f64),
    Steps(Vec<(f64, f64)>),
}

impl Scripted {
    fn at(&self, t: f64) -> f64 {
        match self {
            Scripted::Constant(v) => *v,
            Scripted::Steps(steps) => steps
                .iter()
                .rev()
                .find(|(at, _)| *at <= t)
                .or(steps.first())
                .map_or(0.0, |&(_, v)| v),
        }
    }
}

/// Per reason, the fraction of time the clocks are held down.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct ThrottleScenario {
    #[serde(default)]
    power_cap: Option<f64>,
    #[serde(default)]
    sw_thermal: Option<f64>,
    #[serde(default)]
    hw_thermal: Option<f64>,
    #[serde(default)]
    hw_power_brake: Option<f64>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct EccScenario {
    corrected: Scripted,
    uncorrected: Scripted,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct XidScenario {
    at_s: f64,
    xid: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigScenario {
    total_slices: u32,
    #[serde(default)]
    instances: Vec<MigInstanceScenario>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigInstanceScenario {
    gi: u32,
    #[serde(default)]
    ci: u32,
    slices: u32,
    uuid: String,
    #[serde(default)]
    profile: Option<String>,
}

/// Reading calls made in `[at_s, at_s + for_s)` of scenario time block until its end.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct HangScenario {
    at_s: f64,
    for_s: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProcessScenario {
    pid: u32,
    sm: u32,
}

fn default_name() -> String {
    "Fake NVIDIA GPU".to_string()
}
fn default_period() -> f64 {
    100.0
}

struct Gpu {
    uuid: String,
    name: String,
    minor: u32,
    pci_bus_id: String,
    model: DeviceModel,
    energy_supported: bool,
    power_supported: bool,
    field_values_supported: bool,
    lost_at_s: Option<f64>,
    read_delay_us: u64,
    hang: Option<HangScenario>,
    process_utilization_supported: bool,
    /// (pid, SM %)
    processes: Vec<(u32, u32)>,
    mig: MigState,
    utilization: Option<Scripted>,
    memory_used_bytes: Option<Scripted>,
    memory_total_bytes: u64,
    temperature_c: Option<Scripted>,
    sm_clock_mhz: Option<Scripted>,
    mem_clock_mhz: Option<Scripted>,
    throttle: Option<ThrottleScenario>,
    ecc: Option<EccScenario>,
    xids: Option<Vec<XidScenario>>,
}

/// An event set: the GPUs registered for Xid events, and per GPU how many of its scripted
/// Xids it has delivered.
#[derive(Debug, Default)]
struct EventSet {
    /// (GPU index, Xids delivered so far)
    gpus: Vec<(usize, usize)>,
}

/// A GPU's MIG capability and mode.
enum MigState {
    /// `unsupported: ["mig"]`: every MIG query answers NOT_SUPPORTED.
    Unsupported,
    /// MIG-capable, MIG mode off.
    Disabled,
    /// MIG mode on, with this layout.
    Enabled(MigLayout),
}

struct MigLayout {
    total_slices: u32,
    /// In scenario order: slot `i` is `instances[i]`.
    instances: Vec<MigInstance>,
}

struct MigInstance {
    gi: u32,
    ci: u32,
    slices: u32,
    uuid: String,
    /// e.g. `3g.40gb`
    profile: String,
}

impl Gpu {
    fn mig_layout(&self) -> Option<&MigLayout> {
        match &self.mig {
            MigState::Enabled(l) => Some(l),
            _ => None,
        }
    }
}

/// What a handle names, decoded without the state (see [`State::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Gpu(usize),
    Mig { gpu: usize, slot: usize },
}

fn decode_handle(handle: nvmlDevice_t) -> Option<Target> {
    let h = handle as usize;
    if h >= MIG_HANDLE_BASE {
        let rel = h - MIG_HANDLE_BASE;
        Some(Target::Mig {
            gpu: rel / MIG_SLOTS,
            slot: rel % MIG_SLOTS,
        })
    } else if h >= HANDLE_BASE {
        Some(Target::Gpu(h - HANDLE_BASE))
    } else {
        None
    }
}

fn gpu_handle(index: usize) -> nvmlDevice_t {
    (HANDLE_BASE + index) as *mut nvmlDevice_st
}

fn mig_handle(gpu: usize, slot: usize) -> nvmlDevice_t {
    (MIG_HANDLE_BASE + gpu * MIG_SLOTS + slot) as *mut nvmlDevice_st
}

struct State {
    refcount: u32,
    start_ns: u64,
    time_scale: f64,
    driver_version: String,
    gpus: Vec<Gpu>,
    /// Live event sets (`None` once freed); a handle is `EVENT_SET_BASE + index`.
    event_sets: Vec<Option<EventSet>>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn realtime_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Path of this shared object, found with `dladdr` on one of its own symbols.
fn own_path() -> Option<String> {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only inspects the address; `info` is a valid out-pointer.
    let ok = unsafe { libc::dladdr(own_path as *const libc::c_void, &mut info) };
    if ok == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr returned a NUL-terminated file name owned by the loader.
    Some(
        unsafe { CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned(),
    )
}

fn load_scenario() -> Option<Scenario> {
    let beside = own_path().map(|p| format!("{p}.scenario.json"));
    let path = match beside {
        Some(p) if std::path::Path::new(&p).exists() => p,
        _ => std::env::var("FAKE_NVML_SCENARIO").ok()?,
    };
    let text = std::fs::read_to_string(&path).ok()?;
    match parse_scenario(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("fake-nvml: invalid scenario {path}: {e}");
            None
        }
    }
}

/// Parses and checks a scenario (the checks serde cannot express).
fn parse_scenario(text: &str) -> Result<Scenario, String> {
    let s: Scenario = serde_json::from_str(text).map_err(|e| e.to_string())?;
    for g in &s.gpus {
        if let Some(m) = &g.mig {
            validate_mig(m).map_err(|e| format!("GPU {}: mig: {e}", g.uuid))?;
        }
    }
    Ok(s)
}

fn validate_mig(m: &MigScenario) -> Result<(), String> {
    if m.total_slices == 0 || m.total_slices as usize > MIG_SLOTS {
        return Err(format!(
            "total_slices must be 1..={MIG_SLOTS}, not {}",
            m.total_slices
        ));
    }
    let mut used: u64 = 0;
    let mut seen_gi = std::collections::HashSet::new();
    for inst in &m.instances {
        if inst.slices == 0 {
            return Err(format!("instance gi {} has no slices", inst.gi));
        }
        if !seen_gi.insert(inst.gi) {
            return Err(format!("gi {} appears twice", inst.gi));
        }
        used += u64::from(inst.slices);
    }
    if used > u64::from(m.total_slices) {
        return Err(format!(
            "instances use {used} slices, more than total_slices {}",
            m.total_slices
        ));
    }
    Ok(())
}

fn build_state(s: Scenario) -> State {
    let gpus = s
        .gpus
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let has = |what: &str| !g.unsupported.iter().any(|u| u == what);
            Gpu {
                pci_bus_id: g
                    .pci_bus_id
                    .unwrap_or_else(|| format!("00000000:{:02X}:00.0", 0x17 + i)),
                uuid: g.uuid,
                name: g.name,
                minor: g.minor,
                model: DeviceModel {
                    profile: g.profile,
                    update_period_s: g.update_period_ms / 1000.0,
                    initial_energy_mj: g.initial_energy_mj,
                    reset_at_s: g.reset_at_s,
                },
                energy_supported: has("energy"),
                power_supported: has("power"),
                field_values_supported: has("field_values"),
                lost_at_s: g.lost_at_s,
                read_delay_us: g.read_delay_us,
                hang: g.hang,
                process_utilization_supported: has("process_utilization"),
                processes: g.processes.iter().map(|p| (p.pid, p.sm)).collect(),
                utilization: g.utilization,
                memory_used_bytes: g.memory_used_bytes,
                memory_total_bytes: g.memory_total_bytes,
                temperature_c: g.temperature_c,
                sm_clock_mhz: g.sm_clock_mhz,
                mem_clock_mhz: g.mem_clock_mhz,
                throttle: g.throttle,
                ecc: g.ecc,
                xids: g.xids,
                mig: match g.mig {
                    _ if !has("mig") => MigState::Unsupported,
                    None => MigState::Disabled,
                    Some(m) => MigState::Enabled(MigLayout {
                        total_slices: m.total_slices,
                        instances: m
                            .instances
                            .into_iter()
                            .map(|i| MigInstance {
                                profile: i.profile.unwrap_or_else(|| format!("{}g", i.slices)),
                                gi: i.gi,
                                ci: i.ci,
                                slices: i.slices,
                                uuid: i.uuid,
                            })
                            .collect(),
                    }),
                },
            }
        })
        .collect();
    State {
        refcount: 0,
        start_ns: s.start_monotonic_ns.unwrap_or_else(monotonic_ns),
        time_scale: s.time_scale,
        driver_version: s.driver_version,
        gpus,
        event_sets: Vec::new(),
    }
}

impl State {
    fn now_s(&self) -> f64 {
        let now = monotonic_ns();
        (now.saturating_sub(self.start_ns) as f64 / 1e9) * self.time_scale
    }

    /// The live target of `handle`: a GPU index, or a MIG slot that exists (its GPU is in MIG
    /// mode with MIG supported and has an instance there). `None` for anything else.
    fn resolve(&self, handle: nvmlDevice_t) -> Option<Target> {
        let target = decode_handle(handle)?;
        match target {
            Target::Gpu(i) => (i < self.gpus.len()).then_some(target),
            Target::Mig { gpu, slot } => {
                let layout = self.gpus.get(gpu)?.mig_layout()?;
                (slot < layout.instances.len()).then_some(target)
            }
        }
    }
}

/// What a MIG-aware call is given: a GPU, or one MIG instance with its parent.
enum Dev<'a> {
    Gpu(usize, &'a Gpu),
    Mig {
        gpu: usize,
        parent: &'a Gpu,
        inst: &'a MigInstance,
    },
}

/// Runs `f` with the GPU or MIG device behind `handle` (INVALID_ARGUMENT for an unknown handle),
/// applying "GPU lost" (of the parent, for a MIG device) first.
fn with_dev(handle: nvmlDevice_t, f: impl FnOnce(Dev<'_>) -> nvmlReturn_t) -> nvmlReturn_t {
    with_state(|s| {
        let t = s.now_s();
        let dev = match s.resolve(handle) {
            None => return ERROR_INVALID_ARGUMENT,
            Some(Target::Gpu(i)) => Dev::Gpu(i, &s.gpus[i]),
            Some(Target::Mig { gpu, slot }) => {
                let parent = &s.gpus[gpu];
                let Some(inst) = parent.mig_layout().and_then(|l| l.instances.get(slot)) else {
                    return ERROR_INVALID_ARGUMENT;
                };
                Dev::Mig { gpu, parent, inst }
            }
        };
        let g = match &dev {
            Dev::Gpu(_, g) => g,
            Dev::Mig { parent, .. } => parent,
        };
        if g.lost_at_s.is_some_and(|l| t >= l) {
            return ERROR_GPU_IS_LOST;
        }
        f(dev)
    })
}

/// Runs `f` with the GPU behind `handle` (a MIG-aware call's GPU-only part): `on_mig` for a MIG
/// device handle.
fn with_parent(
    handle: nvmlDevice_t,
    on_mig: nvmlReturn_t,
    f: impl FnOnce(usize, &Gpu) -> nvmlReturn_t,
) -> nvmlReturn_t {
    with_dev(handle, |d| match d {
        Dev::Gpu(i, g) => f(i, g),
        Dev::Mig { .. } => on_mig,
    })
}

/// Runs `f` with the MIG device behind `handle`: INVALID_ARGUMENT for a GPU handle.
fn with_mig(
    handle: nvmlDevice_t,
    f: impl FnOnce(usize, &MigInstance) -> nvmlReturn_t,
) -> nvmlReturn_t {
    with_dev(handle, |d| match d {
        Dev::Gpu(..) => ERROR_INVALID_ARGUMENT,
        Dev::Mig { gpu, inst, .. } => f(gpu, inst),
    })
}

/// Writes `value` through a caller's out-pointer: INVALID_ARGUMENT when it is null.
fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null out-pointer from the caller, who gives room for one `T`.
    unsafe { out.write(value) };
    SUCCESS
}

/// Runs `f` with the initialised state, turning panics into `NVML_ERROR_UNKNOWN`.
fn with_state(f: impl FnOnce(&mut State) -> nvmlReturn_t) -> nvmlReturn_t {
    catch_unwind(AssertUnwindSafe(|| {
        let mut guard = match STATE.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match guard.as_mut() {
            Some(s) if s.refcount > 0 => f(s),
            _ => ERROR_UNINITIALIZED,
        }
    }))
    .unwrap_or(ERROR_UNKNOWN)
}

/// Runs `f` with the GPU behind `handle`, applying "GPU lost" first. A MIG device handle gets
/// `on_mig` (after "GPU lost" of its parent); an unknown handle INVALID_ARGUMENT.
fn with_gpu_or(
    handle: nvmlDevice_t,
    on_mig: nvmlReturn_t,
    f: impl FnOnce(&Gpu, f64) -> nvmlReturn_t,
) -> nvmlReturn_t {
    with_state(|s| {
        let t = s.now_s();
        let g = match s.resolve(handle) {
            None => return ERROR_INVALID_ARGUMENT,
            Some(Target::Gpu(i)) => &s.gpus[i],
            Some(Target::Mig { gpu, .. }) => &s.gpus[gpu],
        };
        if g.lost_at_s.is_some_and(|l| t >= l) {
            return ERROR_GPU_IS_LOST;
        }
        match decode_handle(handle) {
            Some(Target::Gpu(_)) => f(g, t),
            _ => on_mig,
        }
    })
}

/// Runs `f` with the GPU behind `handle`, applying "GPU lost" first; INVALID_ARGUMENT for a
/// MIG device handle.
fn with_gpu(handle: nvmlDevice_t, f: impl FnOnce(&Gpu, f64) -> nvmlReturn_t) -> nvmlReturn_t {
    with_gpu_or(handle, ERROR_INVALID_ARGUMENT, f)
}

/// [`with_gpu`] for the functions that read a value: NOT_SUPPORTED for a MIG device handle (NVML
/// has no per-instance power or energy); also spends the GPU's `read_delay_us`, after the state
/// lock is released.
fn read_gpu(handle: nvmlDevice_t, f: impl FnOnce(&Gpu, f64) -> nvmlReturn_t) -> nvmlReturn_t {
    // A driver call that hangs: it returns (with the value at its return) when the hang ends.
    let mut hang_s = 0.0;
    let mut scale = 1.0;
    with_state(|s| {
        let t = s.now_s();
        scale = s.time_scale;
        if let Some(Target::Gpu(i) | Target::Mig { gpu: i, .. }) = s.resolve(handle) {
            if let Some(h) = s.gpus[i].hang {
                if t >= h.at_s && t < h.at_s + h.for_s {
                    hang_s = h.at_s + h.for_s - t;
                }
            }
        }
        SUCCESS
    });
    if hang_s > 0.0 {
        std::thread::sleep(std::time::Duration::from_secs_f64(hang_s / scale.max(1e-9)));
    }
    let mut delay_us = 0;
    let rc = with_gpu_or(handle, ERROR_NOT_SUPPORTED, |g, t| {
        delay_us = g.read_delay_us;
        f(g, t)
    });
    if delay_us > 0 {
        std::thread::sleep(std::time::Duration::from_micros(delay_us));
    }
    rc
}

fn write_cstr(buf: *mut c_char, len: c_uint, s: &str) -> nvmlReturn_t {
    if buf.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller gave `len` writable bytes and we write at most bytes.len() + 1 <= len.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    SUCCESS
}

fn init() -> nvmlReturn_t {
    catch_unwind(|| {
        let mut guard = match STATE.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.is_none() {
            match load_scenario() {
                Some(s) => *guard = Some(build_state(s)),
                None => return ERROR_DRIVER_NOT_LOADED,
            }
        }
        if let Some(s) = guard.as_mut() {
            s.refcount += 1;
        }
        SUCCESS
    })
    .unwrap_or(ERROR_UNKNOWN)
}

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init()
}

#[no_mangle]
pub extern "C" fn nvmlInit() -> nvmlReturn_t {
    init()
}

#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    init()
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    with_state(|s| {
        s.refcount -= 1;
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let msg: &'static CStr = match result {
        SUCCESS => c"Success",
        ERROR_UNINITIALIZED => c"Uninitialized",
        ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        ERROR_NOT_SUPPORTED => c"Not Supported",
        ERROR_NOT_FOUND => c"Not Found",
        ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded (fake-nvml: no scenario)",
        ERROR_GPU_IS_LOST => c"GPU is lost",
        ERROR_TIMEOUT => c"Timeout",
        _ => c"Unknown Error",
    };
    msg.as_ptr()
}

#[no_mangle]
pub extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> nvmlReturn_t {
    with_state(|s| write_cstr(version, length, &s.driver_version))
}

#[no_mangle]
pub extern "C" fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) -> nvmlReturn_t {
    with_state(|s| write_cstr(version, length, &format!("12.{}", s.driver_version)))
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    with_state(|s| {
        if count.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *count = s.gpus.len() as c_uint };
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_state(|s| {
        if device.is_null() || index as usize >= s.gpus.len() {
            return ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *device = gpu_handle(index as usize) };
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_state(|s| {
        if uuid.is_null() || device.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: the caller passes a NUL-terminated string.
        let wanted = unsafe { CStr::from_ptr(uuid) }.to_string_lossy();
        match s.gpus.iter().position(|g| g.uuid == wanted) {
            Some(i) => {
                // SAFETY: non-null out-pointer from the caller.
                unsafe { *device = gpu_handle(i) };
                SUCCESS
            }
            None => ERROR_NOT_FOUND,
        }
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetIndex(device: nvmlDevice_t, index: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |_, _| {
        if index.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *index = (device as usize - HANDLE_BASE) as c_uint };
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_dev(device, |d| match d {
        Dev::Gpu(_, g) => write_cstr(uuid, length, &g.uuid),
        Dev::Mig { inst, .. } => write_cstr(uuid, length, &inst.uuid),
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_dev(device, |d| match d {
        Dev::Gpu(_, g) => write_cstr(name, length, &g.name),
        Dev::Mig { parent, inst, .. } => write_cstr(
            name,
            length,
            &format!("{} MIG {}", parent.name, inst.profile),
        ),
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMinorNumber(
    device: nvmlDevice_t,
    minor: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |g, _| {
        if minor.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *minor = g.minor };
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    with_gpu(device, |g, _| {
        if pci.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: zeroed is a valid nvmlPciInfo_t (plain integers and char arrays).
        let mut info: nvmlPciInfo_t = unsafe { std::mem::zeroed() };
        let parts: Vec<u32> = g
            .pci_bus_id
            .split([':', '.'])
            .map(|p| u32::from_str_radix(p, 16).unwrap_or(0))
            .collect();
        info.domain = parts.first().copied().unwrap_or(0);
        info.bus = parts.get(1).copied().unwrap_or(0);
        info.device = parts.get(2).copied().unwrap_or(0);
        info.pciDeviceId = 0x2330_10DE;
        info.pciSubSystemId = 0x1839_10DE;
        for (dst, src) in info.busId.iter_mut().zip(g.pci_bus_id.bytes().take(31)) {
            *dst = src as c_char;
        }
        let legacy = g.pci_bus_id.get(4..).unwrap_or("");
        for (dst, src) in info.busIdLegacy.iter_mut().zip(legacy.bytes().take(15)) {
            *dst = src as c_char;
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *pci = info };
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    read_gpu(device, |g, t| {
        if energy.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        if !g.energy_supported {
            return ERROR_NOT_SUPPORTED;
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *energy = g.model.energy_counter_mj(t) };
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    read_gpu(device, |g, t| {
        if power.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        if !g.power_supported {
            return ERROR_NOT_SUPPORTED;
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *power = g.model.power_mw(t) };
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    values_count: c_int,
    values: *mut nvmlFieldValue_t,
) -> nvmlReturn_t {
    read_gpu(device, |g, t| {
        if values.is_null() || values_count < 0 {
            return ERROR_INVALID_ARGUMENT;
        }
        if !g.field_values_supported {
            return ERROR_NOT_SUPPORTED;
        }
        // SAFETY: the caller passes `values_count` initialised entries.
        let entries = unsafe { std::slice::from_raw_parts_mut(values, values_count as usize) };
        let ts = realtime_us();
        for e in entries.iter_mut() {
            e.timestamp = ts;
            e.latencyUsec = 1;
            match e.fieldId {
                field_id::NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION | field_id::NVML_FI_DEV_ENERGY => {
                    if g.energy_supported {
                        e.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
                        e.value.ullVal = g.model.energy_counter_mj(t);
                        e.nvmlReturn = SUCCESS;
                    } else {
                        e.nvmlReturn = ERROR_NOT_SUPPORTED;
                    }
                }
                field_id::NVML_FI_DEV_POWER_INSTANT => {
                    if g.power_supported {
                        e.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT;
                        e.value.uiVal = g.model.power_mw(t);
                        e.nvmlReturn = SUCCESS;
                    } else {
                        e.nvmlReturn = ERROR_NOT_SUPPORTED;
                    }
                }
                id @ (field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP
                | field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN
                | field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN
                | field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN) => {
                    match throttle_fraction(g, id) {
                        Some(f) => {
                            e.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
                            e.value.ullVal = (f.clamp(0.0, 1.0) * t.max(0.0) * 1e9) as u64;
                            e.nvmlReturn = SUCCESS;
                        }
                        None => e.nvmlReturn = ERROR_NOT_SUPPORTED,
                    }
                }
                _ => e.nvmlReturn = ERROR_NOT_SUPPORTED,
            }
        }
        SUCCESS
    })
}

/// The scripted fraction of time throttled for a clock-event-reason field, if any.
fn throttle_fraction(g: &Gpu, id: u32) -> Option<f64> {
    let t = g.throttle.as_ref()?;
    match id {
        field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP => t.power_cap,
        field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN => t.sw_thermal,
        field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN => t.hw_thermal,
        field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN => t.hw_power_brake,
        _ => None,
    }
}

/// A reading of a scripted value: NOT_SUPPORTED when the scenario omits it.
fn scripted_u32(v: Option<&Scripted>, t: f64, out: *mut c_uint) -> nvmlReturn_t {
    match v {
        Some(v) => put(out, v.at(t).max(0.0).round() as c_uint),
        None => ERROR_NOT_SUPPORTED,
    }
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    read_gpu(device, |g, t| match &g.utilization {
        Some(u) => put(
            utilization,
            nvmlUtilization_t {
                gpu: u.at(t).clamp(0.0, 100.0).round() as c_uint,
                memory: 0,
            },
        ),
        None => ERROR_NOT_SUPPORTED,
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    read_gpu(device, |g, t| match &g.memory_used_bytes {
        Some(u) => {
            let used = (u.at(t).max(0.0) as u64).min(g.memory_total_bytes);
            put(
                memory,
                nvmlMemory_v2_t {
                    version: 0,
                    total: g.memory_total_bytes,
                    reserved: 0,
                    free: g.memory_total_bytes - used,
                    used,
                },
            )
        }
        None => ERROR_NOT_SUPPORTED,
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: c_uint,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    read_gpu(device, |g, t| {
        if sensor != 0 {
            return ERROR_NOT_SUPPORTED;
        }
        scripted_u32(g.temperature_c.as_ref(), t, temp)
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock_type: c_uint,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    read_gpu(device, |g, t| match clock_type {
        0 | 1 => scripted_u32(g.sm_clock_mhz.as_ref(), t, clock),
        2 => scripted_u32(g.mem_clock_mhz.as_ref(), t, clock),
        _ => ERROR_NOT_SUPPORTED,
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: c_uint,
    _counter_type: c_uint,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    read_gpu(device, |g, t| {
        let Some(ecc) = &g.ecc else {
            return ERROR_NOT_SUPPORTED;
        };
        let v = match error_type {
            0 => &ecc.corrected,
            1 => &ecc.uncorrected,
            _ => return ERROR_INVALID_ARGUMENT,
        };
        put(count, v.at(t).max(0.0) as c_ulonglong)
    })
}

fn event_set_index(set: nvmlEventSet_t) -> Option<usize> {
    (set as usize).checked_sub(EVENT_SET_BASE)
}

#[no_mangle]
pub extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    with_state(|s| {
        if set.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        s.event_sets.push(Some(EventSet::default()));
        put(
            set,
            (EVENT_SET_BASE + s.event_sets.len() - 1) as *mut nvmlEventSet_st,
        )
    })
}

#[no_mangle]
pub extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    with_state(
        |s| match event_set_index(set).and_then(|i| s.event_sets.get_mut(i)) {
            Some(e @ Some(_)) => {
                *e = None;
                SUCCESS
            }
            _ => ERROR_INVALID_ARGUMENT,
        },
    )
}

#[no_mangle]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    event_types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    with_state(|s| {
        let Some(Target::Gpu(i)) = s.resolve(device) else {
            return ERROR_INVALID_ARGUMENT;
        };
        if s.gpus[i].xids.is_none() || event_types & !u64::from(nvmlEventTypeXidCriticalError) != 0
        {
            return ERROR_NOT_SUPPORTED;
        }
        match event_set_index(set).and_then(|k| s.event_sets.get_mut(k)) {
            Some(Some(e)) => {
                if !e.gpus.iter().any(|(g, _)| *g == i) {
                    e.gpus.push((i, 0));
                }
                SUCCESS
            }
            _ => ERROR_INVALID_ARGUMENT,
        }
    })
}

#[no_mangle]
pub extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    let deadline = monotonic_ns() + u64::from(timeout_ms) * 1_000_000;
    loop {
        let rc = with_state(|s| {
            let t = s.now_s();
            let State {
                gpus, event_sets, ..
            } = s;
            let Some(Some(e)) = event_set_index(set).and_then(|k| event_sets.get_mut(k)) else {
                return ERROR_INVALID_ARGUMENT;
            };
            for (gpu, delivered) in e.gpus.iter_mut() {
                let scripted = gpus[*gpu].xids.as_deref().unwrap_or_default();
                if let Some(x) = scripted.get(*delivered).filter(|x| x.at_s <= t) {
                    *delivered += 1;
                    return put(
                        data,
                        nvmlEventData_t {
                            device: gpu_handle(*gpu),
                            eventType: u64::from(nvmlEventTypeXidCriticalError),
                            eventData: x.xid,
                            gpuInstanceId: u32::MAX,
                            computeInstanceId: u32::MAX,
                        },
                    );
                }
            }
            ERROR_TIMEOUT
        });
        if rc != ERROR_TIMEOUT || monotonic_ns() >= deadline {
            return rc;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Per-process utilisation: the scenario's processes, stamped now (µs since the epoch).
#[no_mangle]
pub extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    utilization: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    _last_seen_timestamp: c_ulonglong,
) -> nvmlReturn_t {
    read_gpu(device, |g, _t| {
        if count.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        if !g.process_utilization_supported {
            return ERROR_NOT_SUPPORTED;
        }
        if g.processes.is_empty() {
            return ERROR_NOT_FOUND;
        }
        let n = g.processes.len() as c_uint;
        // SAFETY: non-null in/out pointer from the caller.
        let room = unsafe { *count };
        if utilization.is_null() || room < n {
            // SAFETY: as above.
            unsafe { *count = n };
            return ERROR_INSUFFICIENT_SIZE;
        }
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        for (i, &(pid, sm)) in g.processes.iter().enumerate() {
            // SAFETY: the caller gave room for `room >= n` samples.
            unsafe {
                *utilization.add(i) = nvmlProcessUtilizationSample_t {
                    pid,
                    timeStamp: now_us,
                    smUtil: sm,
                    memUtil: 0,
                    encUtil: 0,
                    decUtil: 0,
                };
                *count = n;
            }
        }
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    with_parent(device, ERROR_INVALID_ARGUMENT, |_, g| {
        if current.is_null() || pending.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        let mode = match g.mig {
            MigState::Unsupported => return ERROR_NOT_SUPPORTED,
            MigState::Disabled => NVML_DEVICE_MIG_DISABLE,
            MigState::Enabled(_) => NVML_DEVICE_MIG_ENABLE,
        };
        put(current, mode);
        put(pending, mode)
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    with_parent(device, ERROR_INVALID_ARGUMENT, |_, g| match &g.mig {
        MigState::Unsupported => ERROR_NOT_SUPPORTED,
        MigState::Disabled => put(count, 0),
        MigState::Enabled(l) => put(count, l.total_slices),
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_parent(device, ERROR_INVALID_ARGUMENT, |i, g| {
        if mig.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        let index = index as usize;
        match &g.mig {
            MigState::Unsupported => ERROR_NOT_SUPPORTED,
            MigState::Disabled => ERROR_INVALID_ARGUMENT,
            MigState::Enabled(l) if index < l.instances.len() => put(mig, mig_handle(i, index)),
            MigState::Enabled(l) if index < l.total_slices as usize => ERROR_NOT_FOUND,
            MigState::Enabled(_) => ERROR_INVALID_ARGUMENT,
        }
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: nvmlDevice_t,
    is_mig: *mut c_uint,
) -> nvmlReturn_t {
    with_dev(device, |d| match d {
        Dev::Gpu(_, g) if matches!(g.mig, MigState::Unsupported) => ERROR_NOT_SUPPORTED,
        Dev::Gpu(..) => put(is_mig, 0),
        Dev::Mig { .. } => put(is_mig, 1),
    })
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig: nvmlDevice_t,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_mig(mig, |gpu, _| put(device, gpu_handle(gpu)))
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetGpuInstanceId(mig: nvmlDevice_t, id: *mut c_uint) -> nvmlReturn_t {
    with_mig(mig, |_, inst| put(id, inst.gi))
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetComputeInstanceId(
    mig: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    with_mig(mig, |_, inst| put(id, inst.ci))
}

/// Attributes of a MIG device (slice counts, SMs, memory); NOT_SUPPORTED on a GPU.
#[no_mangle]
pub extern "C" fn nvmlDeviceGetAttributes_v2(
    device: nvmlDevice_t,
    attributes: *mut nvmlDeviceAttributes_t,
) -> nvmlReturn_t {
    with_dev(device, |d| match d {
        Dev::Gpu(..) => ERROR_NOT_SUPPORTED,
        Dev::Mig { inst, .. } => put(
            attributes,
            nvmlDeviceAttributes_t {
                multiprocessorCount: SMS_PER_SLICE * inst.slices,
                sharedCopyEngineCount: 1,
                sharedDecoderCount: 0,
                sharedEncoderCount: 0,
                sharedJpegCount: 0,
                sharedOfaCount: 0,
                gpuInstanceSliceCount: inst.slices,
                computeInstanceSliceCount: inst.slices,
                memorySizeMB: MB_PER_SLICE * u64::from(inst.slices),
            },
        ),
    })
}

/// GPU instance profile info of a GPU in MIG mode (see the module docs for which exist).
#[no_mangle]
pub extern "C" fn nvmlDeviceGetGpuInstanceProfileInfo(
    device: nvmlDevice_t,
    profile: c_uint,
    info: *mut nvmlGpuInstanceProfileInfo_t,
) -> nvmlReturn_t {
    with_parent(device, ERROR_INVALID_ARGUMENT, |_, g| {
        if info.is_null() || profile >= NVML_GPU_INSTANCE_PROFILE_COUNT {
            return ERROR_INVALID_ARGUMENT;
        }
        let Some(layout) = g.mig_layout() else {
            return ERROR_NOT_SUPPORTED;
        };
        let total = layout.total_slices;
        let slices = GI_PROFILES
            .iter()
            .find(|&&(id, _)| id == profile)
            .map(|&(_, n)| n)
            .filter(|&n| n <= total && (n <= 4 || n == total));
        let Some(slices) = slices else {
            return ERROR_NOT_SUPPORTED;
        };
        put(
            info,
            nvmlGpuInstanceProfileInfo_t {
                id: profile,
                isP2pSupported: 0,
                sliceCount: slices,
                instanceCount: total / slices,
                multiprocessorCount: SMS_PER_SLICE * slices,
                copyEngineCount: 1,
                decoderCount: 0,
                encoderCount: 0,
                jpegCount: 0,
                ofaCount: 0,
                memorySizeMB: MB_PER_SLICE * u64::from(slices),
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::null_mut;
    use std::sync::MutexGuard;

    /// The library state is global: tests that touch it run one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(state: Option<State>) {
        *STATE.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// Installs `json` as the initialised library state.
    fn install(json: &str) -> MutexGuard<'static, ()> {
        let guard = serial();
        let mut state = build_state(parse_scenario(json).expect("valid scenario"));
        state.refcount = 1;
        set_state(Some(state));
        guard
    }

    const MIG_UUID_1: &str = "MIG-11111111-1111-1111-1111-111111111111";
    const MIG_UUID_2: &str = "MIG-22222222-2222-2222-2222-222222222222";

    /// GPU 0: MIG, 7 slices, GI 1 (3 slices, CI 0) and GI 2 (2 slices, CI 1), 4 slots empty;
    /// GPU 1: MIG disabled; GPU 2: no MIG support; GPU 3: MIG, lost from the start.
    fn scenario() -> String {
        format!(
            r#"{{ "gpus": [
              {{ "uuid": "GPU-0", "name": "Fake A100", "minor": 0,
                 "profile": {{"kind": "constant", "watts": 100}},
                 "mig": {{ "total_slices": 7, "instances": [
                   {{"gi": 1, "ci": 0, "slices": 3, "uuid": "{MIG_UUID_1}", "profile": "3g.40gb"}},
                   {{"gi": 2, "ci": 1, "slices": 2, "uuid": "{MIG_UUID_2}"}} ] }} }},
              {{ "uuid": "GPU-1", "minor": 1, "profile": {{"kind": "constant", "watts": 50}} }},
              {{ "uuid": "GPU-2", "minor": 2, "profile": {{"kind": "constant", "watts": 50}},
                 "unsupported": ["mig"] }},
              {{ "uuid": "GPU-3", "minor": 3, "profile": {{"kind": "constant", "watts": 50}},
                 "lost_at_s": 0.0,
                 "mig": {{ "total_slices": 4, "instances": [
                   {{"gi": 5, "slices": 4, "uuid": "MIG-3"}} ] }} }} ] }}"#
        )
    }

    fn handle(index: u32) -> nvmlDevice_t {
        let mut h = null_mut();
        assert_eq!(nvmlDeviceGetHandleByIndex_v2(index, &mut h), SUCCESS);
        h
    }

    fn mig_by_index(gpu: nvmlDevice_t, index: u32) -> Result<nvmlDevice_t, nvmlReturn_t> {
        let mut h = null_mut();
        match nvmlDeviceGetMigDeviceHandleByIndex(gpu, index, &mut h) {
            SUCCESS => Ok(h),
            rc => Err(rc),
        }
    }

    fn mig_mode(dev: nvmlDevice_t) -> Result<(u32, u32), nvmlReturn_t> {
        let (mut cur, mut pending) = (9, 9);
        match nvmlDeviceGetMigMode(dev, &mut cur, &mut pending) {
            SUCCESS => Ok((cur, pending)),
            rc => Err(rc),
        }
    }

    fn uint(
        f: extern "C" fn(nvmlDevice_t, *mut c_uint) -> nvmlReturn_t,
        dev: nvmlDevice_t,
    ) -> Result<u32, nvmlReturn_t> {
        let mut v = 0;
        match f(dev, &mut v) {
            SUCCESS => Ok(v),
            rc => Err(rc),
        }
    }

    fn string(
        f: extern "C" fn(nvmlDevice_t, *mut c_char, c_uint) -> nvmlReturn_t,
        dev: nvmlDevice_t,
    ) -> Result<String, nvmlReturn_t> {
        let mut buf = [0 as c_char; 96];
        match f(dev, buf.as_mut_ptr(), buf.len() as c_uint) {
            // SAFETY: on success the buffer holds a NUL-terminated string.
            SUCCESS => Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
                .to_string_lossy()
                .into_owned()),
            rc => Err(rc),
        }
    }

    fn attributes(dev: nvmlDevice_t) -> Result<nvmlDeviceAttributes_t, nvmlReturn_t> {
        // SAFETY: plain integers; all-zero is valid.
        let mut a: nvmlDeviceAttributes_t = unsafe { std::mem::zeroed() };
        match nvmlDeviceGetAttributes_v2(dev, &mut a) {
            SUCCESS => Ok(a),
            rc => Err(rc),
        }
    }

    fn profile_info(
        dev: nvmlDevice_t,
        profile: u32,
    ) -> Result<nvmlGpuInstanceProfileInfo_t, nvmlReturn_t> {
        // SAFETY: plain integers; all-zero is valid.
        let mut i: nvmlGpuInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
        match nvmlDeviceGetGpuInstanceProfileInfo(dev, profile, &mut i) {
            SUCCESS => Ok(i),
            rc => Err(rc),
        }
    }

    fn energy(dev: nvmlDevice_t) -> Result<u64, nvmlReturn_t> {
        let mut e = 0;
        match nvmlDeviceGetTotalEnergyConsumption(dev, &mut e) {
            SUCCESS => Ok(e),
            rc => Err(rc),
        }
    }

    #[test]
    fn mig_gpu_enumerates_its_instances() {
        let _g = install(&scenario());
        let gpu = handle(0);
        assert_eq!(mig_mode(gpu), Ok((1, 1)));
        assert_eq!(uint(nvmlDeviceGetMaxMigDeviceCount, gpu), Ok(7));
        assert_eq!(uint(nvmlDeviceIsMigDeviceHandle, gpu), Ok(0));

        let m1 = mig_by_index(gpu, 0).expect("slot 0");
        let m2 = mig_by_index(gpu, 1).expect("slot 1");
        for empty in 2..7 {
            assert_eq!(
                mig_by_index(gpu, empty),
                Err(ERROR_NOT_FOUND),
                "slot {empty}"
            );
        }
        assert_eq!(mig_by_index(gpu, 7), Err(ERROR_INVALID_ARGUMENT));
        assert_ne!(m1, m2);
        for g in 0..4 {
            assert!(m1 != handle(g) && m2 != handle(g));
        }

        for (m, gi, ci, slices, uuid, name) in [
            (m1, 1, 0, 3, MIG_UUID_1, "Fake A100 MIG 3g.40gb"),
            (m2, 2, 1, 2, MIG_UUID_2, "Fake A100 MIG 2g"),
        ] {
            assert_eq!(uint(nvmlDeviceIsMigDeviceHandle, m), Ok(1));
            let mut parent = null_mut();
            assert_eq!(
                nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m, &mut parent),
                SUCCESS
            );
            assert_eq!(parent, gpu);
            assert_eq!(uint(nvmlDeviceGetGpuInstanceId, m), Ok(gi));
            assert_eq!(uint(nvmlDeviceGetComputeInstanceId, m), Ok(ci));
            let a = attributes(m).expect("attributes");
            assert_eq!(a.gpuInstanceSliceCount, slices);
            assert_eq!(a.computeInstanceSliceCount, slices);
            assert_eq!(a.multiprocessorCount, 16 * slices);
            assert_eq!(a.memorySizeMB, 10_240 * u64::from(slices));
            assert_eq!(string(nvmlDeviceGetUUID, m).as_deref(), Ok(uuid));
            assert_eq!(string(nvmlDeviceGetName, m).as_deref(), Ok(name));

            // GPU-only calls refuse a MIG handle rather than misreading it as a GPU index.
            assert_eq!(mig_mode(m), Err(ERROR_INVALID_ARGUMENT));
            assert_eq!(
                uint(nvmlDeviceGetMaxMigDeviceCount, m),
                Err(ERROR_INVALID_ARGUMENT)
            );
            assert_eq!(mig_by_index(m, 0), Err(ERROR_INVALID_ARGUMENT));
            assert_eq!(profile_info(m, 0).map(|_| ()), Err(ERROR_INVALID_ARGUMENT));
            assert_eq!(uint(nvmlDeviceGetIndex, m), Err(ERROR_INVALID_ARGUMENT));
            assert_eq!(
                uint(nvmlDeviceGetMinorNumber, m),
                Err(ERROR_INVALID_ARGUMENT)
            );
            // SAFETY: plain integers and char arrays; all-zero is valid.
            let mut pci: nvmlPciInfo_t = unsafe { std::mem::zeroed() };
            assert_eq!(nvmlDeviceGetPciInfo_v3(m, &mut pci), ERROR_INVALID_ARGUMENT);
        }

        // The parent: no attributes; GI/CI ids are for MIG handles only.
        assert_eq!(attributes(gpu).map(|_| ()), Err(ERROR_NOT_SUPPORTED));
        assert_eq!(
            uint(nvmlDeviceGetGpuInstanceId, gpu),
            Err(ERROR_INVALID_ARGUMENT)
        );
        assert_eq!(
            uint(nvmlDeviceGetComputeInstanceId, gpu),
            Err(ERROR_INVALID_ARGUMENT)
        );
        let mut parent = null_mut();
        assert_eq!(
            nvmlDeviceGetDeviceHandleFromMigDeviceHandle(gpu, &mut parent),
            ERROR_INVALID_ARGUMENT
        );
        assert_eq!(string(nvmlDeviceGetUUID, gpu).as_deref(), Ok("GPU-0"));
        assert_eq!(string(nvmlDeviceGetName, gpu).as_deref(), Ok("Fake A100"));
        assert_eq!(uint(nvmlDeviceGetIndex, gpu), Ok(0));
    }

    #[test]
    fn profile_info_follows_total_slices() {
        let _g = install(&scenario());
        let gpu = handle(0);
        let supported: Vec<(u32, u32, u32)> = (0..NVML_GPU_INSTANCE_PROFILE_COUNT)
            .filter_map(|p| profile_info(gpu, p).ok())
            .map(|i| (i.id, i.sliceCount, i.instanceCount))
            .collect();
        assert_eq!(
            supported,
            [
                (NVML_GPU_INSTANCE_PROFILE_1_SLICE, 1, 7),
                (NVML_GPU_INSTANCE_PROFILE_2_SLICE, 2, 3),
                (NVML_GPU_INSTANCE_PROFILE_3_SLICE, 3, 2),
                (NVML_GPU_INSTANCE_PROFILE_4_SLICE, 4, 1),
                (NVML_GPU_INSTANCE_PROFILE_7_SLICE, 7, 1),
            ]
        );
        let max = supported.iter().map(|&(_, n, _)| n).max();
        assert_eq!(max, Some(7), "the largest profile is the whole GPU");
        let three = profile_info(gpu, NVML_GPU_INSTANCE_PROFILE_3_SLICE).unwrap();
        assert_eq!(three.multiprocessorCount, 48);
        assert_eq!(three.memorySizeMB, 30_720);
        for p in [
            NVML_GPU_INSTANCE_PROFILE_8_SLICE,
            NVML_GPU_INSTANCE_PROFILE_6_SLICE,
        ] {
            assert_eq!(profile_info(gpu, p).map(|_| ()), Err(ERROR_NOT_SUPPORTED));
        }
        assert_eq!(
            profile_info(gpu, NVML_GPU_INSTANCE_PROFILE_COUNT).map(|_| ()),
            Err(ERROR_INVALID_ARGUMENT)
        );
        assert_eq!(
            nvmlDeviceGetGpuInstanceProfileInfo(gpu, 0, null_mut()),
            ERROR_INVALID_ARGUMENT
        );
    }

    #[test]
    fn non_mig_gpu_reports_mig_disabled() {
        let _g = install(&scenario());
        let gpu = handle(1);
        assert_eq!(mig_mode(gpu), Ok((0, 0)));
        assert_eq!(uint(nvmlDeviceGetMaxMigDeviceCount, gpu), Ok(0));
        assert_eq!(uint(nvmlDeviceIsMigDeviceHandle, gpu), Ok(0));
        assert_eq!(mig_by_index(gpu, 0), Err(ERROR_INVALID_ARGUMENT));
        assert_eq!(profile_info(gpu, 0).map(|_| ()), Err(ERROR_NOT_SUPPORTED));
        assert_eq!(attributes(gpu).map(|_| ()), Err(ERROR_NOT_SUPPORTED));
        assert_eq!(
            uint(nvmlDeviceGetGpuInstanceId, gpu),
            Err(ERROR_INVALID_ARGUMENT)
        );
        // A forged MIG handle on a GPU without MIG is no device.
        let forged = mig_handle(1, 0);
        assert_eq!(
            string(nvmlDeviceGetUUID, forged),
            Err(ERROR_INVALID_ARGUMENT)
        );
        assert_eq!(energy(forged), Err(ERROR_INVALID_ARGUMENT));
    }

    #[test]
    fn mig_unsupported_answers_not_supported() {
        let _g = install(&scenario());
        let gpu = handle(2);
        assert_eq!(mig_mode(gpu), Err(ERROR_NOT_SUPPORTED));
        assert_eq!(
            uint(nvmlDeviceGetMaxMigDeviceCount, gpu),
            Err(ERROR_NOT_SUPPORTED)
        );
        assert_eq!(
            uint(nvmlDeviceIsMigDeviceHandle, gpu),
            Err(ERROR_NOT_SUPPORTED)
        );
        assert_eq!(mig_by_index(gpu, 0), Err(ERROR_NOT_SUPPORTED));
        assert_eq!(profile_info(gpu, 0).map(|_| ()), Err(ERROR_NOT_SUPPORTED));
        assert_eq!(attributes(gpu).map(|_| ()), Err(ERROR_NOT_SUPPORTED));
        // The GPU itself still works.
        assert!(energy(gpu).is_ok());
    }

    #[test]
    fn mig_handles_have_no_readings_but_the_parent_has() {
        let _g = install(&scenario());
        let gpu = handle(0);
        let mig = mig_by_index(gpu, 0).unwrap();

        assert_eq!(energy(mig), Err(ERROR_NOT_SUPPORTED));
        let mut mw = 0;
        assert_eq!(nvmlDeviceGetPowerUsage(mig, &mut mw), ERROR_NOT_SUPPORTED);
        // SAFETY: plain data; all-zero is valid.
        let mut fv: nvmlFieldValue_t = unsafe { std::mem::zeroed() };
        fv.fieldId = field_id::NVML_FI_DEV_POWER_INSTANT;
        assert_eq!(
            nvmlDeviceGetFieldValues(mig, 1, &mut fv),
            ERROR_NOT_SUPPORTED
        );
        let mut n = 0;
        assert_eq!(
            nvmlDeviceGetProcessUtilization(mig, null_mut(), &mut n, 0),
            ERROR_NOT_SUPPORTED
        );

        assert!(energy(gpu).is_ok());
        assert_eq!(nvmlDeviceGetPowerUsage(gpu, &mut mw), SUCCESS);
        assert_eq!(mw, 100_000, "the parent reports the whole board");
        assert_eq!(nvmlDeviceGetFieldValues(gpu, 1, &mut fv), SUCCESS);
        assert_eq!(fv.nvmlReturn, SUCCESS);
    }

    #[test]
    fn bogus_and_lost_handles() {
        let _g = install(&scenario());
        let gpu = handle(0);
        // An empty slot, a slot past the layout, a GPU past the list, no handle at all.
        for h in [
            mig_handle(0, 2),
            mig_handle(0, 200),
            mig_handle(9, 0),
            null_mut(),
            (HANDLE_BASE + 4) as nvmlDevice_t,
        ] {
            assert_eq!(string(nvmlDeviceGetUUID, h), Err(ERROR_INVALID_ARGUMENT));
            assert_eq!(
                uint(nvmlDeviceIsMigDeviceHandle, h),
                Err(ERROR_INVALID_ARGUMENT)
            );
            assert_eq!(energy(h), Err(ERROR_INVALID_ARGUMENT));
        }
        // Null out-pointers.
        assert_eq!(
            nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0, null_mut()),
            ERROR_INVALID_ARGUMENT
        );
        assert_eq!(
            nvmlDeviceGetMaxMigDeviceCount(gpu, null_mut()),
            ERROR_INVALID_ARGUMENT
        );
        // A lost GPU takes its MIG devices with it (handle made directly: the GPU is lost).
        let lost_mig = mig_handle(3, 0);
        assert_eq!(mig_mode(handle(3)), Err(ERROR_GPU_IS_LOST));
        assert_eq!(
            uint(nvmlDeviceGetGpuInstanceId, lost_mig),
            Err(ERROR_GPU_IS_LOST)
        );
        assert_eq!(energy(lost_mig), Err(ERROR_GPU_IS_LOST));
    }

    #[test]
    fn bad_mig_layouts_are_rejected() {
        let gpu = |mig: &str| {
            format!(
                r#"{{"gpus": [{{"uuid": "GPU-0", "minor": 0,
                    "profile": {{"kind": "constant", "watts": 1}}, "mig": {mig}}}]}}"#
            )
        };
        let inst = |gi: u32, slices: u32| {
            format!(r#"{{"gi": {gi}, "slices": {slices}, "uuid": "MIG-{gi}"}}"#)
        };
        let ok = gpu(&format!(
            r#"{{"total_slices": 7, "instances": [{}, {}]}}"#,
            inst(1, 4),
            inst(2, 3)
        ));
        assert!(parse_scenario(&ok).is_ok());
        for (what, mig) in [
            ("no slices", r#"{"total_slices": 0}"#.to_string()),
            ("too many slices", r#"{"total_slices": 257}"#.to_string()),
            (
                "over-full",
                format!(
                    r#"{{"total_slices": 7, "instances": [{}, {}]}}"#,
                    inst(1, 4),
                    inst(2, 4)
                ),
            ),
            (
                "empty instance",
                format!(r#"{{"total_slices": 7, "instances": [{}]}}"#, inst(1, 0)),
            ),
            (
                "duplicate gi",
                format!(
                    r#"{{"total_slices": 7, "instances": [{}, {}]}}"#,
                    inst(1, 1),
                    inst(1, 2)
                ),
            ),
            (
                "unknown field",
                r#"{"total_slices": 7, "instances": [], "mode": 1}"#.to_string(),
            ),
            (
                "missing uuid",
                r#"{"total_slices": 7, "instances": [{"gi": 1, "slices": 1}]}"#.to_string(),
            ),
        ] {
            assert!(parse_scenario(&gpu(&mig)).is_err(), "{what} accepted");
        }
    }

    /// Through the real load path: a bad layout fails init, a good one initialises.
    #[test]
    fn init_loads_and_checks_the_mig_layout() {
        let _g = serial();
        let dir = std::env::temp_dir().join(format!("fake-nvml-mig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scenario.json");
        std::env::set_var("FAKE_NVML_SCENARIO", &path);

        let bad = scenario().replace(r#""gi": 2"#, r#""gi": 1"#);
        std::fs::write(&path, bad).unwrap();
        set_state(None);
        assert_eq!(nvmlInit_v2(), ERROR_DRIVER_NOT_LOADED);

        std::fs::write(&path, scenario()).unwrap();
        assert_eq!(nvmlInit_v2(), SUCCESS);
        assert_eq!(uint(nvmlDeviceGetMaxMigDeviceCount, handle(0)), Ok(7));
        assert_eq!(nvmlShutdown(), SUCCESS);

        set_state(None);
        std::env::remove_var("FAKE_NVML_SCENARIO");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// GPU 0 scripts every activity query; GPU 1 none of them.
    fn activity_scenario() -> &'static str {
        r#"{ "start_monotonic_ns": 0, "time_scale": 0.0, "gpus": [
          { "uuid": "GPU-A", "minor": 0, "profile": {"kind": "constant", "watts": 100},
            "utilization": 37, "memory_used_bytes": [[0, 1000], [5, 3000]],
            "memory_total_bytes": 10000, "temperature_c": 61,
            "sm_clock_mhz": 1410, "mem_clock_mhz": 1593,
            "throttle": {"power_cap": 0.5, "hw_thermal": 0.25},
            "ecc": {"corrected": 10, "uncorrected": 2},
            "xids": [{"at_s": 0.0, "xid": 79}, {"at_s": 100.0, "xid": 48}] },
          { "uuid": "GPU-B", "minor": 1, "profile": {"kind": "constant", "watts": 50} } ] }"#
    }

    #[test]
    fn scripted_values_follow_their_steps() {
        let s = Scripted::Steps(vec![(1.0, 10.0), (2.0, 20.0)]);
        assert_eq!(s.at(0.0), 10.0, "before the first step: its value");
        assert_eq!(s.at(1.5), 10.0);
        assert_eq!(s.at(2.0), 20.0);
        assert_eq!(Scripted::Constant(3.0).at(99.0), 3.0);
    }

    #[test]
    fn activity_queries_serve_the_script_or_not_supported() {
        let _g = install(activity_scenario());
        // time_scale 0: scenario time stays 0.
        let (a, b) = (handle(0), handle(1));
        let mut u = nvmlUtilization_t { gpu: 0, memory: 9 };
        assert_eq!(nvmlDeviceGetUtilizationRates(a, &mut u), SUCCESS);
        assert_eq!((u.gpu, u.memory), (37, 0));
        assert_eq!(
            nvmlDeviceGetUtilizationRates(b, &mut u),
            ERROR_NOT_SUPPORTED
        );

        // SAFETY: plain integers.
        let mut m: nvmlMemory_v2_t = unsafe { std::mem::zeroed() };
        assert_eq!(nvmlDeviceGetMemoryInfo_v2(a, &mut m), SUCCESS);
        assert_eq!((m.used, m.total, m.free), (1000, 10000, 9000));
        assert_eq!(nvmlDeviceGetMemoryInfo_v2(b, &mut m), ERROR_NOT_SUPPORTED);

        let mut v = 0;
        assert_eq!(nvmlDeviceGetTemperature(a, 0, &mut v), SUCCESS);
        assert_eq!(v, 61);
        assert_eq!(nvmlDeviceGetTemperature(b, 0, &mut v), ERROR_NOT_SUPPORTED);
        assert_eq!(nvmlDeviceGetClockInfo(a, 1, &mut v), SUCCESS);
        assert_eq!(v, 1410);
        assert_eq!(nvmlDeviceGetClockInfo(a, 2, &mut v), SUCCESS);
        assert_eq!(v, 1593);
        assert_eq!(nvmlDeviceGetClockInfo(b, 1, &mut v), ERROR_NOT_SUPPORTED);

        let mut c = 0;
        assert_eq!(nvmlDeviceGetTotalEccErrors(a, 0, 0, &mut c), SUCCESS);
        assert_eq!(c, 10);
        assert_eq!(nvmlDeviceGetTotalEccErrors(a, 1, 1, &mut c), SUCCESS);
        assert_eq!(c, 2);
        assert_eq!(
            nvmlDeviceGetTotalEccErrors(b, 0, 0, &mut c),
            ERROR_NOT_SUPPORTED
        );
    }

    #[test]
    fn throttle_counters_grow_with_scenario_time_per_reason() {
        let _g = install(activity_scenario());
        with_state(|s| {
            s.time_scale = 1.0;
            s.start_ns = monotonic_ns() - 2_000_000_000;
            SUCCESS
        });
        let ids = [
            field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP,
            field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN,
            field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN,
            field_id::NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN,
        ];
        // SAFETY: plain integers and a union of integers.
        let mut v: [nvmlFieldValue_t; 4] = unsafe { std::mem::zeroed() };
        for (e, id) in v.iter_mut().zip(ids) {
            e.fieldId = id;
        }
        assert_eq!(
            nvmlDeviceGetFieldValues(handle(0), 4, v.as_mut_ptr()),
            SUCCESS
        );
        assert_eq!(v[0].nvmlReturn, SUCCESS);
        assert_eq!(v[1].nvmlReturn, ERROR_NOT_SUPPORTED, "not scripted");
        assert_eq!(v[2].nvmlReturn, SUCCESS);
        assert_eq!(v[3].nvmlReturn, ERROR_NOT_SUPPORTED);
        // SAFETY: the entries say they are unsigned long long.
        let (p, h) = unsafe { (v[0].value.ullVal, v[2].value.ullVal) };
        assert!(
            (1.0e9..1.1e9).contains(&(p as f64)),
            "power cap {p} ns after 2 s"
        );
        assert!((0.5e9..0.55e9).contains(&(h as f64)), "hw thermal {h} ns");
        assert_eq!(
            nvmlDeviceGetFieldValues(handle(1), 4, v.as_mut_ptr()),
            SUCCESS
        );
        assert!(v.iter().all(|e| e.nvmlReturn == ERROR_NOT_SUPPORTED));
    }

    #[test]
    fn xid_events_are_delivered_once_when_due_and_only_to_registered_gpus() {
        let _g = install(activity_scenario());
        let mut set = null_mut();
        assert_eq!(nvmlEventSetCreate(&mut set), SUCCESS);
        let xid = u64::from(nvmlEventTypeXidCriticalError);
        assert_eq!(
            nvmlDeviceRegisterEvents(handle(1), xid, set),
            ERROR_NOT_SUPPORTED,
            "a GPU without scripted Xids cannot register"
        );
        // SAFETY: plain integers and a pointer.
        let mut d: nvmlEventData_t = unsafe { std::mem::zeroed() };
        assert_eq!(
            nvmlEventSetWait_v2(set, &mut d, 0),
            ERROR_TIMEOUT,
            "nothing registered"
        );
        assert_eq!(nvmlDeviceRegisterEvents(handle(0), xid, set), SUCCESS);
        assert_eq!(nvmlEventSetWait_v2(set, &mut d, 0), SUCCESS);
        assert_eq!((d.device, d.eventType, d.eventData), (handle(0), xid, 79));
        let t0 = monotonic_ns();
        assert_eq!(
            nvmlEventSetWait_v2(set, &mut d, 30),
            ERROR_TIMEOUT,
            "delivered once; the second is not due (scenario time stays 0)"
        );
        assert!(
            monotonic_ns() - t0 >= 30_000_000,
            "a wait sleeps until its timeout"
        );
        assert_eq!(nvmlEventSetFree(set), SUCCESS);
        assert_eq!(nvmlEventSetWait_v2(set, &mut d, 0), ERROR_INVALID_ARGUMENT);
    }
}
