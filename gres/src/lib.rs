//! Which GPUs of a node a Slurm job has, as device minor numbers (and MIG instances) ergond can
//! match to NVML devices. Used by the SPANK plugin (at a job's start) and by ergond (for jobs
//! it finds already running, from their environment).
//!
//! Slurm tells a job its GPUs as indices (`SLURM_JOB_GPUS=0,2`) into the node's GPU list in
//! gres.conf order. NVML knows devices by minor number (`/dev/nvidiaN`), UUID and PCI bus id, and
//! index 2 is not `/dev/nvidia2` in general (jobstats and slurm-job-exporter both met this bug).
//! So ergon reads the node's gres.conf, lists its GPUs in order, and takes each allocated
//! device file's minor number from the file itself (`stat`), never from its name.
//!
//! The list has one entry per GRES device: each file of a `File=` line (`File=/dev/nvidia[0-3]`
//! is four GPUs), and each `MultipleFiles=` line as a whole (one GPU made of several files: a MIG
//! instance is its parent `/dev/nvidiaN` plus its `/dev/nvidia-caps/nvidia-capM` files). For a
//! MIG instance the plugin finds the parent's minor among the files (char major 195) and the GPU
//! and compute instance ids by looking the caps' minors up in
//! `/proc/driver/nvidia-caps/mig-minors`.
//!
//! Reading files ([`allocations`]) is kept apart from the mapping ([`resolve`]), which is pure.

#![deny(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ergon_protocol::{GpuAlloc, MigAlloc};

/// Where the NVIDIA driver lists the minors of its MIG capability devices.
pub const DEFAULT_MIG_MINORS: &str = "/proc/driver/nvidia-caps/mig-minors";
/// Most of the mig-minors file read. The driver lists every possible instance (32 GPUs × 15 GPU
/// instances × 8 compute instances: about 100 KiB), so this leaves room and still bounds a bad
/// path.
pub const MIG_MINORS_MAX_BYTES: u64 = 256 * 1024;
/// Char major of `/dev/nvidiaN` (and of `nvidiactl`, `nvidia-modeset`, which are not GPUs).
pub const NVIDIA_MAJOR: u32 = 195;
/// Minors from this one up on major 195 are control devices (254 `nvidia-modeset`, 255
/// `nvidiactl`), not GPUs.
pub const NVIDIA_FIRST_CONTROL_MINOR: u32 = 254;

/// Parses `SLURM_JOB_GPUS` (`"0,1"`, possibly empty). Entries that are not numbers are skipped.
pub fn parse_job_gpus(value: &str) -> Vec<u32> {
    value
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// One GPU in the node's gres.conf list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GresGpu {
    /// One file of a `File=` line.
    File(PathBuf),
    /// A `MultipleFiles=` line: several files that are one GPU (a MIG instance).
    Multiple(Vec<PathBuf>),
}

impl GresGpu {
    /// The device's files.
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            GresGpu::File(p) => std::slice::from_ref(p),
            GresGpu::Multiple(ps) => ps,
        }
    }
}

/// The GPUs of `node` listed in a gres.conf text, in order: one per file of each `File=` line,
/// one per `MultipleFiles=` line.
///
/// Handles `Name=gpu File=/dev/nvidia[0-3]`, comma lists (`File=/dev/nvidia0,/dev/nvidia1`),
/// bracket lists (`[0,2-3]`), `MultipleFiles=` (commas and brackets allowed, all one device) and
/// `NodeName=` filters (exact names and `prefix[1-4]` ranges). `File=` and `MultipleFiles=` are
/// exclusive in Slurm; a line with both (which slurmd refuses) is read as `MultipleFiles=`.
pub fn gres_gpus(gres_conf: &str, node: &str) -> Vec<GresGpu> {
    let mut gpus = Vec::new();
    for line in gres_conf.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut name_is_gpu = false;
        let mut node_matches = true;
        let mut file = None;
        let mut multiple = None;
        for word in line.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            match k.to_ascii_lowercase().as_str() {
                "name" => name_is_gpu = v == "gpu",
                "nodename" => node_matches = expand_hostlist(v).iter().any(|n| n == node),
                "file" => file = Some(v.to_string()),
                "multiplefiles" => multiple = Some(v.to_string()),
                _ => {}
            }
        }
        if !(name_is_gpu && node_matches) {
            continue;
        }
        if let Some(multiple) = multiple {
            let files: Vec<PathBuf> = expand_hostlist(&multiple)
                .into_iter()
                .map(PathBuf::from)
                .collect();
            if !files.is_empty() {
                gpus.push(GresGpu::Multiple(files));
            }
        } else if let Some(file) = file {
            gpus.extend(
                expand_hostlist(&file)
                    .into_iter()
                    .map(|f| GresGpu::File(PathBuf::from(f))),
            );
        }
    }
    gpus
}

/// Expands Slurm's bracket notation: `a[0-2,5]b,c` → `a0b a1b a2b a5b c`.
pub fn expand_hostlist(spec: &str) -> Vec<String> {
    let mut out = Vec::new();
    // Split on commas outside brackets.
    let mut depth = 0;
    let mut start = 0;
    let mut parts = Vec::new();
    for (i, ch) in spec.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&spec[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&spec[start..]);
    for part in parts.into_iter().filter(|p| !p.is_empty()) {
        match (part.find('['), part.find(']')) {
            (Some(open), Some(close)) if open < close => {
                let (prefix, suffix) = (&part[..open], &part[close + 1..]);
                for range in part[open + 1..close].split(',') {
                    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                    let width = lo.len();
                    if let (Ok(lo), Ok(hi)) = (lo.parse::<u32>(), hi.parse::<u32>()) {
                        for n in lo..=hi.min(lo.saturating_add(4096)) {
                            for tail in expand_hostlist(suffix)
                                .into_iter()
                                .chain(suffix.is_empty().then(String::new))
                            {
                                out.push(format!("{prefix}{n:0width$}{tail}"));
                            }
                        }
                    }
                }
            }
            _ => out.push(part.to_string()),
        }
    }
    out
}

/// A character device's `(major, minor)`, read from the file (not its name); `None` for a missing
/// file or anything that is not a character device.
pub fn char_device(path: &Path) -> Option<(u32, u32)> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_char_device() {
        return None;
    }
    Some((libc::major(meta.rdev()), libc::minor(meta.rdev())))
}

/// The minor number of a character device file, read from the file (not its name).
pub fn device_minor(path: &Path) -> Option<u32> {
    char_device(path).map(|(_, minor)| minor)
}

/// A MIG capability device named in mig-minors: `gpuN/giG/access` (`ci: None`) or
/// `gpuN/giG/ciC/access`. `gpu` is the parent GPU's device minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigCap {
    pub gpu: u32,
    pub gi: u32,
    pub ci: Option<u32>,
}

/// mig-minors as a map from capability device minor to what it grants.
pub type MigMinors = HashMap<u32, MigCap>;

/// Parses `/proc/driver/nvidia-caps/mig-minors` (`gpu0/gi1/access 21`,
/// `gpu0/gi1/ci0/access 22`, one per line). Other lines (`config 1`, `monitor 2`, anything
/// unexpected) are skipped.
pub fn parse_mig_minors(text: &str) -> MigMinors {
    fn id(word: &str, prefix: &str) -> Option<u32> {
        word.strip_prefix(prefix)?.parse().ok()
    }
    fn line(line: &str) -> Option<(u32, MigCap)> {
        let mut words = line.split_whitespace();
        let (name, minor) = (words.next()?, words.next()?.parse().ok()?);
        if words.next().is_some() {
            return None;
        }
        let parts: Vec<&str> = name.split('/').collect();
        let cap = match parts.as_slice() {
            [gpu, gi, "access"] => MigCap {
                gpu: id(gpu, "gpu")?,
                gi: id(gi, "gi")?,
                ci: None,
            },
            [gpu, gi, ci, "access"] => MigCap {
                gpu: id(gpu, "gpu")?,
                gi: id(gi, "gi")?,
                ci: Some(id(ci, "ci")?),
            },
            _ => return None,
        };
        Some((minor, cap))
    }
    text.lines().filter_map(line).collect()
}

/// One file of a GRES device as `stat` found it: `dev` is `(major, minor)` for a character
/// device, `None` otherwise (missing, unreadable, not a device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFile {
    pub path: PathBuf,
    pub dev: Option<(u32, u32)>,
}

impl DeviceFile {
    /// Stats `path`.
    pub fn stat(path: &Path) -> Self {
        DeviceFile {
            path: path.to_path_buf(),
            dev: char_device(path),
        }
    }
}

/// Maps one `MultipleFiles=` device allocated as GPU `index` (pure: the files are already
/// stat'ed). Returns what to send and, when something could not be resolved, a line for the log.
///
/// - minor: the file that is a GPU (char major 195, minor below 254); if there is none, the
///   `gpuN` of its MIG capabilities.
/// - MIG: the capability files (other majors) whose minors mig-minors lists; `gpuN/giG/access`
///   gives the GPU instance, `gpuN/giG/ciC/access` the compute instance (none without such a
///   file). Sent only when they name exactly one GPU instance, of the same GPU as the device file.
pub fn resolve_multiple(
    index: u32,
    files: &[DeviceFile],
    mig_minors: &MigMinors,
) -> (GpuAlloc, Option<String>) {
    let parents: BTreeSet<u32> = files
        .iter()
        .filter_map(|f| match f.dev {
            Some((NVIDIA_MAJOR, minor)) if minor < NVIDIA_FIRST_CONTROL_MINOR => Some(minor),
            _ => None,
        })
        .collect();
    let caps: Vec<MigCap> = files
        .iter()
        .filter_map(|f| match f.dev {
            Some((major, minor)) if major != NVIDIA_MAJOR => mig_minors.get(&minor).copied(),
            _ => None,
        })
        .collect();
    let instances: BTreeSet<(u32, u32)> = caps.iter().map(|c| (c.gpu, c.gi)).collect();
    let compute: BTreeSet<u32> = caps.iter().filter_map(|c| c.ci).collect();

    let mut problems = Vec::new();
    let mut minor = parents.first().copied();
    let mut mig = None;
    match instances.iter().collect::<Vec<_>>().as_slice() {
        [] => problems.push(
            "none of its files is a MIG capability device listed in the mig-minors file"
                .to_string(),
        ),
        [&(gpu, gi)] => match minor {
            Some(m) if !parents.contains(&gpu) => problems.push(format!(
                "its GPU device file is minor {m} but its MIG capability is of gpu{gpu}"
            )),
            _ => {
                minor = Some(gpu);
                let ci = match compute.iter().collect::<Vec<_>>().as_slice() {
                    [&ci] => Some(ci),
                    [] => None,
                    several => {
                        problems.push(format!(
                            "its MIG capabilities name several compute instances {several:?}, \
                             none is sent"
                        ));
                        None
                    }
                };
                mig = Some(MigAlloc {
                    gpu_instance_id: gi,
                    compute_instance_id: ci,
                });
            }
        },
        several => problems.push(format!(
            "its MIG capabilities name several GPU instances (gpu, gi) {several:?}"
        )),
    }
    if minor.is_none() {
        problems.push("none of its files is a GPU device (char 195:N)".to_string());
    } else if parents.len() > 1 && mig.is_none() {
        problems.push(format!(
            "it has {} GPU device files (minors {parents:?}), the lowest is taken",
            parents.len()
        ));
    }
    let note = (!problems.is_empty()).then(|| {
        let names: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
        format!(
            "GPU index {index} (gres.conf MultipleFiles={}): {}; sent with minor {} and {}",
            names.join(","),
            problems.join("; "),
            minor.map_or("unknown".to_string(), |m| m.to_string()),
            if mig.is_some() {
                "its MIG instance"
            } else {
                "no MIG instance"
            }
        )
    });
    (GpuAlloc { index, minor, mig }, note)
}

/// Reads at most `max` bytes of a file (for /proc files, whose size `stat` does not give).
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Maps allocated GPU indices to [`GpuAlloc`]s, with the minor number where gres.conf names the
/// device file; `minor: None` when it does not (e.g. `AutoDetect=nvml` without `File=`). For a
/// `MultipleFiles=` device, see [`resolve_multiple`]; `mig_minors` is read only then, once.
/// Returns the allocations and lines for the log about what could not be resolved; it never
/// fails.
pub fn allocations(
    indices: &[u32],
    gpus: &[GresGpu],
    mig_minors: &Path,
) -> (Vec<GpuAlloc>, Vec<String>) {
    let mut table: Option<MigMinors> = None;
    let mut notes = Vec::new();
    let allocs = indices
        .iter()
        .map(|&index| match gpus.get(index as usize) {
            None => GpuAlloc {
                index,
                minor: None,
                mig: None,
            },
            Some(GresGpu::File(path)) => GpuAlloc {
                index,
                minor: device_minor(path),
                mig: None,
            },
            Some(GresGpu::Multiple(paths)) => {
                let table = table.get_or_insert_with(|| {
                    match read_bounded(mig_minors, MIG_MINORS_MAX_BYTES) {
                        Ok(text) => parse_mig_minors(&text),
                        Err(e) => {
                            notes.push(format!(
                                "cannot read {}: {e}; MIG instances cannot be named",
                                mig_minors.display()
                            ));
                            MigMinors::new()
                        }
                    }
                });
                let files: Vec<DeviceFile> = paths.iter().map(|p| DeviceFile::stat(p)).collect();
                let (alloc, note) = resolve_multiple(index, &files, table);
                notes.extend(note);
                alloc
            }
        })
        .collect();
    (allocs, notes)
}

/// Where gres.conf is: the plugin's `gres_conf=` argument, else beside `$SLURM_CONF`, else
/// `/etc/slurm/gres.conf`.
pub fn gres_conf_path(configured: Option<&Path>, slurm_conf: Option<&str>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    if let Some(dir) = slurm_conf.map(Path::new).and_then(Path::parent) {
        return dir.join("gres.conf");
    }
    PathBuf::from("/etc/slurm/gres.conf")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(index: u32, minor: Option<u32>, mig: Option<(u32, Option<u32>)>) -> GpuAlloc {
        GpuAlloc {
            index,
            minor,
            mig: mig.map(|(gi, ci)| MigAlloc {
                gpu_instance_id: gi,
                compute_instance_id: ci,
            }),
        }
    }

    fn file(path: &str, dev: Option<(u32, u32)>) -> DeviceFile {
        DeviceFile {
            path: PathBuf::from(path),
            dev,
        }
    }

    const MIG_MINORS: &str = "config 1\n\
                              monitor 2\n\
                              gpu0/gi1/access 21\n\
                              gpu0/gi1/ci0/access 22\n\
                              gpu0/gi2/access 30\n\
                              gpu0/gi2/ci0/access 31\n\
                              gpu1/gi1/access 156\n\
                              gpu1/gi1/ci0/access 157\n";

    #[test]
    fn job_gpus() {
        assert_eq!(parse_job_gpus("0,1"), vec![0, 1]);
        assert_eq!(parse_job_gpus(""), Vec::<u32>::new());
        assert_eq!(parse_job_gpus("3"), vec![3]);
    }

    #[test]
    fn hostlists() {
        assert_eq!(
            expand_hostlist("/dev/nvidia[0-2]"),
            ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2"]
        );
        assert_eq!(expand_hostlist("n[01-02,5]"), ["n01", "n02", "n5"]);
        assert_eq!(expand_hostlist("/dev/a,/dev/b"), ["/dev/a", "/dev/b"]);
        assert_eq!(expand_hostlist("node7"), ["node7"]);
    }

    fn files(paths: &[&str]) -> Vec<GresGpu> {
        paths
            .iter()
            .map(|p| GresGpu::File(PathBuf::from(p)))
            .collect()
    }

    #[test]
    fn gres_conf_files_in_order_for_this_node() {
        let conf = "AutoDetect=off\n\
                    # comment Name=gpu File=/nope\n\
                    NodeName=gpu[1-2] Name=gpu Type=a100 File=/dev/nvidia[2-3]\n\
                    NodeName=gpu[1-2] Name=gpu Type=a100 File=/dev/nvidia0,/dev/nvidia1\n\
                    NodeName=other Name=gpu File=/dev/nvidia[0-7]\n\
                    Name=mps Count=100\n";
        assert_eq!(
            gres_gpus(conf, "gpu2"),
            files(&[
                "/dev/nvidia2",
                "/dev/nvidia3",
                "/dev/nvidia0",
                "/dev/nvidia1"
            ])
        );
        assert!(gres_gpus(conf, "cpu1").is_empty());
    }

    #[test]
    fn multiple_files_lines_are_one_gpu_each_in_order_with_file_lines() {
        let conf = "\
            NodeName=mig[1-2] Name=gpu Type=3g.40gb MultipleFiles=/dev/nvidia0,/dev/nvidia-caps/nvidia-cap21,/dev/nvidia-caps/nvidia-cap22\n\
            NodeName=mig[1-2] Name=gpu Type=3g.40gb MultipleFiles=/dev/nvidia0,/dev/nvidia-caps/nvidia-cap[30-31]\n\
            NodeName=mig[1-2] Name=gpu Type=a100 File=/dev/nvidia[2-3]\n\
            NodeName=other Name=gpu MultipleFiles=/dev/nvidia5,/dev/nvidia-caps/nvidia-cap99\n\
            NodeName=mig[1-2] Name=gpu Type=1g.10gb MultipleFiles=/dev/nvidia1,/dev/nvidia-caps/nvidia-cap156 # trailing\n\
            NodeName=mig[1-2] Name=gpu File=/dev/nvidia4\n\
            NodeName=mig[1-2] Name=mps Count=100 MultipleFiles=/dev/nvidia7,/dev/x\n";
        let multiple = |ps: &[&str]| GresGpu::Multiple(ps.iter().map(PathBuf::from).collect());
        let gpus = gres_gpus(conf, "mig2");
        assert_eq!(
            gpus,
            [
                multiple(&[
                    "/dev/nvidia0",
                    "/dev/nvidia-caps/nvidia-cap21",
                    "/dev/nvidia-caps/nvidia-cap22"
                ]),
                multiple(&[
                    "/dev/nvidia0",
                    "/dev/nvidia-caps/nvidia-cap30",
                    "/dev/nvidia-caps/nvidia-cap31"
                ]),
                GresGpu::File(PathBuf::from("/dev/nvidia2")),
                GresGpu::File(PathBuf::from("/dev/nvidia3")),
                multiple(&["/dev/nvidia1", "/dev/nvidia-caps/nvidia-cap156"]),
                GresGpu::File(PathBuf::from("/dev/nvidia4")),
            ]
        );
        // Whole GPUs after the MIG lines keep their indices: 2 and 3 are /dev/nvidia2 and 3,
        // 5 is /dev/nvidia4.
        assert_eq!(gpus[5].paths(), [PathBuf::from("/dev/nvidia4")]);
        assert_eq!(gres_gpus(conf, "other").len(), 1);
        assert!(gres_gpus(conf, "cpu1").is_empty());
    }

    #[test]
    fn mig_minors_are_parsed_and_garbage_skipped() {
        let text = format!(
            "{MIG_MINORS}garbage\n\ngpu0/gi3/access\ngpu0/gi3/access x\ngpuX/gi3/access 40\n\
             gpu0/gi3/ci0/extra/access 41\ngpu0/gi3/access 42 43\n  gpu2/gi7/ci3/access   900  \n"
        );
        let m = parse_mig_minors(&text);
        assert_eq!(m.len(), 7, "{m:?}");
        assert_eq!(
            m[&21],
            MigCap {
                gpu: 0,
                gi: 1,
                ci: None
            }
        );
        assert_eq!(
            m[&22],
            MigCap {
                gpu: 0,
                gi: 1,
                ci: Some(0)
            }
        );
        assert_eq!(
            m[&900],
            MigCap {
                gpu: 2,
                gi: 7,
                ci: Some(3)
            }
        );
        assert!(!m.contains_key(&1) && !m.contains_key(&2) && !m.contains_key(&40));
    }

    #[test]
    fn mig_instance_with_gpu_and_compute_instance() {
        let m = parse_mig_minors(MIG_MINORS);
        let (a, note) = resolve_multiple(
            4,
            &[
                file("/dev/nvidia0", Some((195, 0))),
                file("/dev/nvidia-caps/nvidia-cap30", Some((508, 30))),
                file("/dev/nvidia-caps/nvidia-cap31", Some((508, 31))),
            ],
            &m,
        );
        assert_eq!(a, alloc(4, Some(0), Some((2, Some(0)))));
        assert_eq!(note, None);
    }

    #[test]
    fn mig_instance_with_gpu_instance_only() {
        let m = parse_mig_minors(MIG_MINORS);
        let (a, note) = resolve_multiple(
            0,
            &[
                file("/dev/nvidia1", Some((195, 1))),
                file("/dev/nvidia-caps/nvidia-cap156", Some((508, 156))),
            ],
            &m,
        );
        assert_eq!(a, alloc(0, Some(1), Some((1, None))));
        assert_eq!(note, None);
    }

    #[test]
    fn control_devices_are_not_gpus_and_minor_falls_back_to_mig_minors_gpu() {
        let m = parse_mig_minors(MIG_MINORS);
        let (a, note) = resolve_multiple(
            1,
            &[
                file("/dev/nvidiactl", Some((195, 255))),
                file("/dev/nvidia-modeset", Some((195, 254))),
                file("/dev/nvidia-caps/nvidia-cap156", Some((508, 156))),
                file("/dev/nvidia-caps/nvidia-cap157", Some((508, 157))),
            ],
            &m,
        );
        assert_eq!(a, alloc(1, Some(1), Some((1, Some(0)))));
        assert_eq!(note, None);
        // Several GPU files: the one the capability belongs to.
        let (a, note) = resolve_multiple(
            1,
            &[
                file("/dev/nvidia0", Some((195, 0))),
                file("/dev/nvidia1", Some((195, 1))),
                file("/dev/nvidia-caps/nvidia-cap156", Some((508, 156))),
            ],
            &m,
        );
        assert_eq!(a, alloc(1, Some(1), Some((1, None))));
        assert_eq!(note, None);
    }

    #[test]
    fn unresolvable_mig_sends_no_instance_and_says_why() {
        let m = parse_mig_minors(MIG_MINORS);
        // Caps missing (not stat'able), or mig-minors unreadable (empty table).
        let members = [
            file("/dev/nvidia0", Some((195, 0))),
            file("/dev/nvidia-caps/nvidia-cap21", None),
        ];
        let (a, note) = resolve_multiple(2, &members, &m);
        assert_eq!(a, alloc(2, Some(0), None));
        let note = note.unwrap();
        assert!(
            note.contains("GPU index 2")
                && note.contains("/dev/nvidia-caps/nvidia-cap21")
                && note.contains("no MIG instance"),
            "{note}"
        );
        let members = [
            file("/dev/nvidia0", Some((195, 0))),
            file("/dev/nvidia-caps/nvidia-cap21", Some((508, 21))),
        ];
        let (a, note) = resolve_multiple(2, &members, &MigMinors::new());
        assert_eq!(a, alloc(2, Some(0), None));
        assert!(note.is_some());
        // Nothing at all: no minor either.
        let (a, note) = resolve_multiple(3, &[file("/nope", None)], &m);
        assert_eq!(a, alloc(3, None, None));
        let note = note.unwrap();
        assert!(note.contains("minor unknown"), "{note}");
        // A cap of another GPU than the device file: the device file's minor, no instance.
        let (a, note) = resolve_multiple(
            0,
            &[
                file("/dev/nvidia0", Some((195, 0))),
                file("/dev/nvidia-caps/nvidia-cap156", Some((508, 156))),
            ],
            &m,
        );
        assert_eq!(a, alloc(0, Some(0), None));
        assert!(note.unwrap().contains("gpu1"));
        // Two GPU instances in one device: ambiguous.
        let (a, note) = resolve_multiple(
            0,
            &[
                file("/dev/nvidia0", Some((195, 0))),
                file("/dev/nvidia-caps/nvidia-cap21", Some((508, 21))),
                file("/dev/nvidia-caps/nvidia-cap30", Some((508, 30))),
            ],
            &m,
        );
        assert_eq!(a, alloc(0, Some(0), None));
        assert!(note.is_some());
    }

    #[test]
    fn minors_come_from_the_device_not_its_name() {
        // /dev/null is char 1:3; a regular file has no minor.
        let gpus = files(&["/dev/null", "/etc/hostname"]);
        let (a, notes) = allocations(&[0, 1, 5], &gpus, Path::new("/nonexistent/mig-minors"));
        assert_eq!(
            a,
            [
                alloc(0, Some(3), None),
                alloc(1, None, None),
                alloc(5, None, None)
            ]
        );
        // mig-minors is not read when no MultipleFiles device is allocated.
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn mig_minors_is_read_for_multiple_files_devices_and_its_absence_logged_once() {
        let dir = std::env::temp_dir().join(format!("ergon-gpus-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // /dev/null (1:3) stands for a capability device: minor 3 in this mig-minors.
        let table = dir.join("mig-minors");
        std::fs::write(&table, "config 1\ngpu4/gi9/access 3\n").unwrap();
        let gpus = [
            GresGpu::Multiple(vec![PathBuf::from("/dev/null")]),
            GresGpu::File(PathBuf::from("/dev/null")),
        ];
        let (a, notes) = allocations(&[0, 1], &gpus, &table);
        assert_eq!(
            a,
            [alloc(0, Some(4), Some((9, None))), alloc(1, Some(3), None)]
        );
        assert!(notes.is_empty(), "{notes:?}");

        let missing = dir.join("missing");
        let gpus = [
            GresGpu::Multiple(vec![PathBuf::from("/dev/null")]),
            GresGpu::Multiple(vec![PathBuf::from("/dev/null")]),
        ];
        let (a, notes) = allocations(&[0, 1], &gpus, &missing);
        assert_eq!(a, [alloc(0, None, None), alloc(1, None, None)]);
        assert_eq!(
            notes.iter().filter(|n| n.contains("cannot read")).count(),
            1,
            "{notes:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bounded_read_stops_at_the_cap() {
        let dir = std::env::temp_dir().join(format!("ergon-gpus-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big");
        std::fs::write(&path, "x".repeat(1000)).unwrap();
        assert_eq!(read_bounded(&path, 10).unwrap().len(), 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gres_conf_location() {
        assert_eq!(
            gres_conf_path(None, Some("/opt/slurm/etc/slurm.conf")),
            PathBuf::from("/opt/slurm/etc/gres.conf")
        );
        assert_eq!(
            gres_conf_path(None, None),
            PathBuf::from("/etc/slurm/gres.conf")
        );
        assert_eq!(
            gres_conf_path(Some(Path::new("/x/g.conf")), Some("/a/slurm.conf")),
            PathBuf::from("/x/g.conf")
        );
    }
}
