//! The only unsafe part of the plugin: Slurm's SPANK C ABI, through `slurm-spank`'s raw bindings.
//!
//! Why not `slurm-spank`'s safe `Plugin` trait: `--energy-report` takes an *optional* value, and
//! in allocator context (sbatch, salloc) Slurm only accepts options registered at run time with
//! `spank_option_register` — the static `spank_options` table is ignored there. slurm-spank 0.2
//! can only register options whose value is required and does not expose the raw handle, so the
//! hooks are declared here, each one small, each wrapped in `catch_unwind`, each returning 0:
//! nothing ergon does may fail a job. The one exception is the option callback, which fails the
//! submission on an invalid value, as the user asked for something that cannot be done.

use std::ffi::{c_char, c_int, c_uint, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use slurm_spank::spank_sys as sys;

include!(concat!(env!("OUT_DIR"), "/slurm_version.rs"));

/// Plugin identity symbols Slurm's plugin loader looks up.
#[no_mangle]
#[used]
pub static plugin_name: [u8; 12] = *b"spank_ergon\0";
#[no_mangle]
#[used]
pub static plugin_type: [u8; 6] = *b"spank\0";
#[no_mangle]
#[used]
pub static plugin_version: c_uint = SLURM_VERSION_NUMBER;

/// The context a hook runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// srun (the user's process).
    Local,
    /// slurmstepd: the step's daemon and its task processes.
    Remote,
    /// sbatch, salloc.
    Allocator,
    /// slurmd itself.
    Slurmd,
    /// The job prolog and epilog run by slurmd.
    JobScript,
    /// Anything else.
    Other,
}

/// A SPANK handle for the duration of one hook call.
pub struct Spank {
    raw: sys::spank_t,
    argv: Vec<String>,
}

impl Spank {
    /// # Safety
    /// `raw`, `ac` and `av` must be what Slurm passed to the hook.
    unsafe fn new(raw: sys::spank_t, ac: c_int, av: *mut *mut c_char) -> Spank {
        let mut argv = Vec::new();
        if !av.is_null() {
            for i in 0..ac.max(0) as usize {
                let p = *av.add(i);
                if !p.is_null() {
                    argv.push(CStr::from_ptr(p).to_string_lossy().into_owned());
                }
            }
        }
        Spank { raw, argv }
    }

    /// The plugin's arguments from plugstack.conf.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    pub fn context(&self) -> Context {
        // SAFETY: no arguments; valid in every hook.
        match unsafe { sys::spank_context() } {
            sys::spank_context_S_CTX_LOCAL => Context::Local,
            sys::spank_context_S_CTX_REMOTE => Context::Remote,
            sys::spank_context_S_CTX_ALLOCATOR => Context::Allocator,
            sys::spank_context_S_CTX_SLURMD => Context::Slurmd,
            sys::spank_context_S_CTX_JOB_SCRIPT => Context::JobScript,
            _ => Context::Other,
        }
    }

    /// An item whose C type is a 32-bit integer (`uint32_t`, `uid_t`, `gid_t`, `int`, `pid_t`).
    fn item_u32(&self, item: sys::spank_item) -> Option<u32> {
        let mut value: u32 = 0;
        // SAFETY: every item passed here writes one 32-bit integer through the pointer.
        let rc = unsafe { sys::spank_get_item(self.raw, item, &mut value as *mut u32) };
        (rc == sys::ESPANK_SUCCESS).then_some(value)
    }

    /// The job's memory allocation on this node, MiB (`S_JOB_ALLOC_MEM`, a `uint64_t`); `None`
    /// where Slurm gives none (0) or the item is unavailable in this context.
    pub fn job_alloc_mem_mb(&self) -> Option<u64> {
        let mut value: u64 = 0;
        // SAFETY: S_JOB_ALLOC_MEM writes one uint64_t through the pointer.
        let rc = unsafe {
            sys::spank_get_item(
                self.raw,
                sys::spank_item_S_JOB_ALLOC_MEM,
                &mut value as *mut u64,
            )
        };
        (rc == sys::ESPANK_SUCCESS && value > 0).then_some(value)
    }

    pub fn job_id(&self) -> Option<u32> {
        self.item_u32(sys::spank_item_S_JOB_ID)
    }
    pub fn step_id(&self) -> Option<u32> {
        self.item_u32(sys::spank_item_S_JOB_STEPID)
    }
    pub fn uid(&self) -> Option<u32> {
        self.item_u32(sys::spank_item_S_JOB_UID)
    }
    pub fn gid(&self) -> Option<u32> {
        self.item_u32(sys::spank_item_S_JOB_GID)
    }
    /// The local id of the task a task hook runs for.
    pub fn task_id(&self) -> Option<u32> {
        self.item_u32(sys::spank_item_S_TASK_ID)
    }
    pub fn task_pid(&self) -> Option<u32> {
        self.item_u32(sys::spank_item_S_TASK_PID)
    }
    pub fn task_exit_status(&self) -> Option<i32> {
        self.item_u32(sys::spank_item_S_TASK_EXIT_STATUS)
            .map(|v| v as i32)
    }
    pub fn local_task_count(&self) -> Option<u32> {
        self.item_u32(sys::spank_item_S_JOB_LOCAL_TASK_COUNT)
    }

    /// A variable of the job's environment (remote context), `None` if unset or unavailable.
    pub fn getenv(&self, name: &str) -> Option<String> {
        let name = CString::new(name).ok()?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: buf is writable for its length; spank_getenv NUL-terminates on success.
        let rc = unsafe {
            sys::spank_getenv(
                self.raw,
                name.as_ptr(),
                buf.as_mut_ptr() as *mut c_char,
                buf.len() as c_int,
            )
        };
        if rc != sys::ESPANK_SUCCESS {
            return None;
        }
        let end = buf.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&buf[..end]).into_owned()).filter(|s| !s.is_empty())
    }

    /// Whether `--energy-report` was given to this job and its value, read with
    /// `spank_option_getopt` (prolog/epilog and remote contexts).
    pub fn energy_report_option(&self) -> Option<Option<String>> {
        let mut opt = energy_report_spec();
        let mut optarg: *mut c_char = std::ptr::null_mut();
        // SAFETY: opt is a valid option description; optarg receives a Slurm-owned string.
        let rc = unsafe { sys::spank_option_getopt(self.raw, &mut opt, &mut optarg) };
        if rc != sys::ESPANK_SUCCESS {
            return None;
        }
        if optarg.is_null() {
            return Some(None);
        }
        // SAFETY: non-null, NUL-terminated, owned by Slurm for the hook's duration.
        Some(Some(
            unsafe { CStr::from_ptr(optarg) }
                .to_string_lossy()
                .into_owned(),
        ))
    }

    fn register_energy_report(&self) -> Result<(), u32> {
        let mut opt = energy_report_spec();
        // SAFETY: valid handle and option; Slurm copies what it keeps.
        let rc = unsafe { sys::spank_option_register(self.raw, &mut opt) };
        if rc == sys::ESPANK_SUCCESS {
            Ok(())
        } else {
            Err(rc)
        }
    }
}

fn energy_report_spec() -> sys::spank_option {
    sys::spank_option {
        name: c"energy-report".as_ptr(),
        arginfo: c"text|json".as_ptr(),
        usage: c"Report this job's energy (GPU, CPU, DRAM) when it ends, as text (default) or json. From ergon.".as_ptr(),
        // 2: the value is optional (--energy-report or --energy-report=json).
        has_arg: 2,
        val: 0,
        cb: Some(energy_report_callback),
    }
}

extern "C" fn energy_report_callback(_val: c_int, optarg: *const c_char, _remote: c_int) -> c_int {
    catch_unwind(|| {
        let value = (!optarg.is_null())
            // SAFETY: Slurm passes a NUL-terminated string valid for the call.
            .then(|| {
                unsafe { CStr::from_ptr(optarg) }
                    .to_string_lossy()
                    .into_owned()
            });
        match crate::option_given(value.as_deref()) {
            Ok(()) => 0,
            Err(msg) => {
                log_error(&msg);
                -1
            }
        }
    })
    .unwrap_or(-1)
}

/// Logs an error through Slurm: stderr in sbatch/srun/salloc, where the user must see it (an
/// invalid option value). Not for node-side problems: in slurmstepd, errors are also copied to
/// the job's stderr, and ergon must not write into users' output.
pub fn log_error(msg: &str) {
    let Ok(msg) = CString::new(format!("spank_ergon: {msg}").replace('\0', " ")) else {
        return;
    };
    // SAFETY: "%s" with one valid C string.
    unsafe { sys::slurm_error(c"%s".as_ptr(), msg.as_ptr()) }
}

/// Logs a warning for the node's admin: info level, which reaches the slurmd log (slurmd,
/// prolog/epilog and slurmstepd all log there at the default `SlurmdDebug=info`) but not the
/// job's own stderr.
pub fn log_warning(msg: &str) {
    let Ok(msg) = CString::new(format!("spank_ergon: warning: {msg}").replace('\0', " ")) else {
        return;
    };
    // SAFETY: "%s" with one valid C string.
    unsafe { sys::slurm_info(c"%s".as_ptr(), msg.as_ptr()) }
}

/// Logs at debug level (shown with SlurmdDebug=debug).
pub fn log_debug(msg: &str) {
    let Ok(msg) = CString::new(format!("spank_ergon: {msg}").replace('\0', " ")) else {
        return;
    };
    // SAFETY: "%s" with one valid C string.
    unsafe { sys::slurm_debug(c"%s".as_ptr(), msg.as_ptr()) }
}

/// Runs a hook body with panics caught; always reports success to Slurm.
fn hook(name: &str, raw: sys::spank_t, ac: c_int, av: *mut *mut c_char, f: fn(&Spank)) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the arguments are those Slurm passed to the hook.
        let spank = unsafe { Spank::new(raw, ac, av) };
        f(&spank)
    }));
    if result.is_err() {
        log_warning(&format!(
            "internal error (panic) in {name}; ignored, the job continues"
        ));
    }
    0
}

macro_rules! hooks {
    ($($c:ident => $rust:path),* $(,)?) => {$(
        #[no_mangle]
        pub extern "C" fn $c(sp: sys::spank_t, ac: c_int, av: *mut *mut c_char) -> c_int {
            hook(stringify!($c), sp, ac, av, $rust)
        }
    )*};
}

hooks! {
    slurm_spank_job_prolog => crate::job_prolog,
    slurm_spank_task_post_fork => crate::task_post_fork,
    slurm_spank_task_exit => crate::task_exit,
    slurm_spank_exit => crate::exit,
    slurm_spank_job_epilog => crate::job_epilog,
}

/// `slurm_spank_init`: registers `--energy-report` (in every context where options exist, as
/// Slurm requires) and reads the plugin's arguments.
#[no_mangle]
pub extern "C" fn slurm_spank_init(sp: sys::spank_t, ac: c_int, av: *mut *mut c_char) -> c_int {
    hook("slurm_spank_init", sp, ac, av, |spank| {
        if matches!(
            spank.context(),
            Context::Local | Context::Remote | Context::Allocator
        ) {
            if let Err(rc) = spank.register_energy_report() {
                log_warning(&format!(
                    "cannot register --energy-report (spank error {rc})"
                ));
            }
        }
        crate::init(spank);
    })
}
