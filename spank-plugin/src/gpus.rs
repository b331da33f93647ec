//! Which GPUs of this node a job has, as device minor numbers ergond can match to NVML devices.
//!
//! Slurm tells a job its GPUs as indices (`SLURM_JOB_GPUS=0,2`) into the node's GPU list in
//! gres.conf order. NVML knows devices by minor number (`/dev/nvidiaN`), UUID and PCI bus id, and
//! index 2 is not `/dev/nvidia2` in general (jobstats and slurm-job-exporter both met this bug).
//! So the plugin reads the node's gres.conf, expands its `File=` lists in order, and takes each
//! allocated device file's minor number from the file itself (`stat`), never from its name.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ergon_protocol::GpuAlloc;

/// Parses `SLURM_JOB_GPUS` (`"0,1"`, possibly empty). Entries that are not numbers are skipped.
pub fn parse_job_gpus(value: &str) -> Vec<u32> {
    value
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// The GPU device files of `node` listed in a gres.conf text, in order.
///
/// Handles `Name=gpu File=/dev/nvidia[0-3]`, comma lists (`File=/dev/nvidia0,/dev/nvidia1`),
/// bracket lists (`[0,2-3]`) and `NodeName=` filters (exact names and `prefix[1-4]` ranges).
pub fn gres_gpu_files(gres_conf: &str, node: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for line in gres_conf.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut name_is_gpu = false;
        let mut node_matches = true;
        let mut file = None;
        for word in line.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            match k.to_ascii_lowercase().as_str() {
                "name" => name_is_gpu = v == "gpu",
                "nodename" => node_matches = expand_hostlist(v).iter().any(|n| n == node),
                "file" => file = Some(v.to_string()),
                _ => {}
            }
        }
        if let (true, true, Some(file)) = (name_is_gpu, node_matches, file) {
            files.extend(expand_hostlist(&file).into_iter().map(PathBuf::from));
        }
    }
    files
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

/// The minor number of a character device file, read from the file (not its name).
pub fn device_minor(path: &Path) -> Option<u32> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_char_device() {
        return None;
    }
    Some(libc::minor(meta.rdev()))
}

/// Maps allocated GPU indices to [`GpuAlloc`]s, with the minor number where gres.conf names the
/// device file; `minor: None` when it does not (e.g. `AutoDetect=nvml` without `File=`).
pub fn allocations(indices: &[u32], files: &[PathBuf]) -> Vec<GpuAlloc> {
    indices
        .iter()
        .map(|&index| GpuAlloc {
            index,
            minor: files.get(index as usize).and_then(|f| device_minor(f)),
        })
        .collect()
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

    #[test]
    fn gres_conf_files_in_order_for_this_node() {
        let conf = "AutoDetect=off\n\
                    # comment Name=gpu File=/nope\n\
                    NodeName=gpu[1-2] Name=gpu Type=a100 File=/dev/nvidia[2-3]\n\
                    NodeName=gpu[1-2] Name=gpu Type=a100 File=/dev/nvidia0,/dev/nvidia1\n\
                    NodeName=other Name=gpu File=/dev/nvidia[0-7]\n\
                    Name=mps Count=100\n";
        assert_eq!(
            gres_gpu_files(conf, "gpu2"),
            [
                "/dev/nvidia2",
                "/dev/nvidia3",
                "/dev/nvidia0",
                "/dev/nvidia1"
            ]
            .map(PathBuf::from)
        );
        assert!(gres_gpu_files(conf, "cpu1").is_empty());
    }

    #[test]
    fn minors_come_from_the_device_not_its_name() {
        // /dev/null is char 1:3; a regular file has no minor.
        let files = [PathBuf::from("/dev/null"), PathBuf::from("/etc/hostname")];
        let a = allocations(&[0, 1, 5], &files);
        assert_eq!(
            a[0],
            GpuAlloc {
                index: 0,
                minor: Some(3)
            }
        );
        assert_eq!(
            a[1],
            GpuAlloc {
                index: 1,
                minor: None
            }
        );
        assert_eq!(
            a[2],
            GpuAlloc {
                index: 5,
                minor: None
            }
        );
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
