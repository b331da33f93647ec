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
//! `processes` (default none) are what `nvmlDeviceGetProcessUtilization` reports: each process
//! with its SM utilisation (%), constant; `unsupported` may name `process_utilization`.
//!
//! Every exported function catches panics and returns `NVML_ERROR_UNKNOWN` instead of unwinding
//! into C.

#![allow(non_snake_case)]
// The exported functions are C entry points: their callers (NVML clients) uphold the C API's
// pointer contract, and each function null-checks what it dereferences.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod profile;

use nvml_wrapper_sys::bindings::{
    field_id, nvmlDevice_st, nvmlDevice_t, nvmlFieldValue_t, nvmlPciInfo_t,
    nvmlProcessUtilizationSample_t, nvmlReturn_t, nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT,
    nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
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
const ERROR_GPU_IS_LOST: nvmlReturn_t = 15;
const ERROR_UNKNOWN: nvmlReturn_t = 999;

/// Handles are tagged pointers `HANDLE_BASE + index`; nvml-wrapper never dereferences them.
const HANDLE_BASE: usize = 0x6_0000;

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
    processes: Vec<ProcessScenario>,
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
    process_utilization_supported: bool,
    /// (pid, SM %)
    processes: Vec<(u32, u32)>,
}

struct State {
    refcount: u32,
    start_ns: u64,
    time_scale: f64,
    driver_version: String,
    gpus: Vec<Gpu>,
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
    match serde_json::from_str(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("fake-nvml: invalid scenario {path}: {e}");
            None
        }
    }
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
                process_utilization_supported: has("process_utilization"),
                processes: g.processes.iter().map(|p| (p.pid, p.sm)).collect(),
            }
        })
        .collect();
    State {
        refcount: 0,
        start_ns: s.start_monotonic_ns.unwrap_or_else(monotonic_ns),
        time_scale: s.time_scale,
        driver_version: s.driver_version,
        gpus,
    }
}

impl State {
    fn now_s(&self) -> f64 {
        let now = monotonic_ns();
        (now.saturating_sub(self.start_ns) as f64 / 1e9) * self.time_scale
    }
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

/// Runs `f` with the device behind `handle`, applying "GPU lost" first.
fn with_gpu(handle: nvmlDevice_t, f: impl FnOnce(&Gpu, f64) -> nvmlReturn_t) -> nvmlReturn_t {
    with_state(|s| {
        let idx = (handle as usize).wrapping_sub(HANDLE_BASE);
        let t = s.now_s();
        match s.gpus.get(idx) {
            None => ERROR_INVALID_ARGUMENT,
            Some(g) if g.lost_at_s.is_some_and(|l| t >= l) => ERROR_GPU_IS_LOST,
            Some(g) => f(g, t),
        }
    })
}

/// [`with_gpu`] for the functions that read a value: also spends the GPU's `read_delay_us`,
/// after the state lock is released.
fn read_gpu(handle: nvmlDevice_t, f: impl FnOnce(&Gpu, f64) -> nvmlReturn_t) -> nvmlReturn_t {
    let mut delay_us = 0;
    let rc = with_gpu(handle, |g, t| {
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
        unsafe { *device = (HANDLE_BASE + index as usize) as *mut nvmlDevice_st };
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
                unsafe { *device = (HANDLE_BASE + i) as *mut nvmlDevice_st };
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
    with_gpu(device, |g, _| write_cstr(uuid, length, &g.uuid))
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |g, _| write_cstr(name, length, &g.name))
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
                _ => e.nvmlReturn = ERROR_NOT_SUPPORTED,
            }
        }
        SUCCESS
    })
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
