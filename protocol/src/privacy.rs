//! Who may read jobs' energy: the `private_data` setting that ergond (`ergond.toml`) and `ergon`
//! (`accounting.toml`) share, and how `auto` follows the cluster's own Slurm `PrivateData`.
//!
//! When private, the files that hold per-job figures (manifests and the spool's directories,
//! the records database, the accounting state, quarantine) are readable by root and an optional
//! group only ([`Modes`]); a user reads their own jobs' figures through `sacct`, where slurmdbd
//! applies its own `PrivateData`. When not private, the modes are those ergon always used.
//!
//! `auto` (the default) is private when `scontrol show config` lists `jobs`, `usage` or
//! `accounts` in `PrivateData`; when `scontrol` cannot be run or its output has no
//! `PrivateData` line, it is private too (fail closed), and [`Resolved::why`] says why.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivateData {
    /// Follow Slurm's `PrivateData` (`jobs`, `usage` or `accounts`: private).
    #[default]
    Auto,
    /// Always private.
    Yes,
    /// Never private: every user may read every job's figures (ergon's behaviour before the
    /// setting existed).
    No,
}

/// The setting resolved against the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Whether per-job figures are private.
    pub private: bool,
    /// Why, for the log and `ergon status`.
    pub why: String,
}

/// The `PrivateData` words of Slurm that make ergon's data private: a user who may not see
/// other users' jobs (`jobs`), their usage (`usage`) or their accounts' (`accounts`) must not
/// see their energy either.
pub const PRIVATE_WORDS: [&str; 3] = ["jobs", "usage", "accounts"];

/// The value of the `PrivateData` line in `scontrol show config` output (`None`: no such line).
pub fn private_data_line(config: &str) -> Option<&str> {
    config.lines().find_map(|l| {
        let (key, value) = l.split_once('=')?;
        (key.trim() == "PrivateData").then(|| value.trim())
    })
}

/// Whether a `PrivateData` value (`none`, `accounts,jobs`, …, case-insensitive) makes job data
/// private.
pub fn is_private(value: &str) -> bool {
    value
        .split(',')
        .map(|w| w.trim().to_ascii_lowercase())
        .any(|w| PRIVATE_WORDS.contains(&w.as_str()))
}

/// Resolve `setting`: `yes` and `no` as they are; `auto` from `scontrol show config` (the
/// program `scontrol`, with no shell, at most `timeout`), closed on any failure.
pub fn resolve(setting: PrivateData, scontrol: &Path, timeout: Duration) -> Resolved {
    match setting {
        PrivateData::Yes => Resolved {
            private: true,
            why: "private_data = \"yes\"".into(),
        },
        PrivateData::No => Resolved {
            private: false,
            why: "private_data = \"no\"".into(),
        },
        PrivateData::Auto => match scontrol_config(scontrol, timeout) {
            Err(e) => Resolved {
                private: true,
                why: format!(
                    "private_data = \"auto\" and Slurm's PrivateData is unknown ({e}): private \
                     (set private_data = \"yes\" or \"no\" to decide)"
                ),
            },
            Ok(text) => from_scontrol_output(&text),
        },
    }
}

/// `auto` from `scontrol show config` output.
pub fn from_scontrol_output(text: &str) -> Resolved {
    match private_data_line(text) {
        None => Resolved {
            private: true,
            why: "private_data = \"auto\" and `scontrol show config` has no PrivateData line: \
                  private"
                .into(),
        },
        Some(v) if is_private(v) => Resolved {
            private: true,
            why: format!("private_data = \"auto\" and Slurm's PrivateData = {v}: private"),
        },
        Some(v) => Resolved {
            private: false,
            why: format!(
                "private_data = \"auto\" and Slurm's PrivateData = {v} (no jobs, usage or \
                 accounts): not private"
            ),
        },
    }
}

/// `scontrol show config`'s output, or why there is none.
fn scontrol_config(scontrol: &Path, timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(scontrol)
        .args(["show", "config"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", scontrol.display()))?;
    // The output is read on a thread so that a hung slurmctld costs at most `timeout`.
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut text = String::new();
        let mut etext = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.take(4 << 20).read_to_string(&mut text);
        }
        if let Some(e) = err.as_mut() {
            let _ = e.take(4096).read_to_string(&mut etext);
        }
        let _ = tx.send((text, etext));
    });
    let Ok((text, etext)) = rx.recv_timeout(timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "{} show config did not answer in {timeout:?}",
            scontrol.display()
        ));
    };
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!(
            "{} show config failed ({status}): {}",
            scontrol.display(),
            etext.trim()
        ));
    }
    Ok(text)
}

/// File and directory modes (and group) for data that is private or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    /// Whether the data is private.
    pub private: bool,
    /// The group that may read it when private (`None`: root only).
    pub gid: Option<u32>,
}

impl Modes {
    /// Not private: ergon's modes before the setting existed.
    pub const OPEN: Modes = Modes {
        private: false,
        gid: None,
    };

    /// A directory's mode: 0755 when not private; 0750 with a group, 0700 without.
    pub fn dir(&self) -> u32 {
        match (self.private, self.gid) {
            (false, _) => 0o755,
            (true, Some(_)) => 0o750,
            (true, None) => 0o700,
        }
    }

    /// A data file's mode: 0644 when not private; 0640 with a group, 0600 without.
    pub fn file(&self) -> u32 {
        match (self.private, self.gid) {
            (false, _) => 0o644,
            (true, Some(_)) => 0o640,
            (true, None) => 0o600,
        }
    }

    /// Give `path` (not following a symlink) this data's group when private with a group, and
    /// its mode (`dir` for a directory) when private; when not private, nothing is changed.
    pub fn apply(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        if !self.private {
            return Ok(());
        }
        let md = std::fs::symlink_metadata(path)?;
        if md.file_type().is_symlink() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is a symlink", path.display()),
            ));
        }
        if let Some(gid) = self.gid {
            if md.gid() != gid {
                std::os::unix::fs::lchown(path, None, Some(gid))?;
            }
        }
        let mode = if md.is_dir() { self.dir() } else { self.file() };
        if md.mode() & 0o7777 != mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn jobs_usage_or_accounts_make_it_private() {
        for v in [
            "jobs",
            "accounts,jobs",
            "USAGE",
            "cloud, accounts",
            "events,jobs,nodes",
        ] {
            assert!(is_private(v), "{v}");
        }
        for v in [
            "none",
            "",
            "nodes,partitions",
            "cloud,events,reservations,users",
        ] {
            assert!(!is_private(v), "{v}");
        }
    }

    #[test]
    fn auto_reads_the_private_data_line() {
        let open =
            "ClusterName             = c\nPrivateData             = none\nProctrackType = x\n";
        let r = from_scontrol_output(open);
        assert!(!r.private, "{r:?}");
        assert!(r.why.contains("none"), "{r:?}");
        let closed = "PriorityType = p\nPrivateData             = accounts,jobs,usage\n";
        assert!(from_scontrol_output(closed).private);
        // No line at all: closed, and said so.
        let r = from_scontrol_output("ClusterName = c\n");
        assert!(r.private && r.why.contains("no PrivateData line"), "{r:?}");
    }

    #[test]
    fn auto_fails_closed_when_scontrol_cannot_run() {
        let r = resolve(
            PrivateData::Auto,
            Path::new("/nonexistent/scontrol"),
            Duration::from_secs(5),
        );
        assert!(r.private, "{r:?}");
        assert!(r.why.contains("cannot run /nonexistent/scontrol"), "{r:?}");
        // A program that fails: closed too.
        let r = resolve(
            PrivateData::Auto,
            Path::new("/bin/false"),
            Duration::from_secs(5),
        );
        assert!(r.private && r.why.contains("failed"), "{r:?}");
        // yes and no never run scontrol.
        assert!(resolve(PrivateData::Yes, Path::new("/bin/false"), Duration::ZERO).private);
        assert!(!resolve(PrivateData::No, Path::new("/bin/false"), Duration::ZERO).private);
    }

    #[test]
    fn auto_runs_scontrol_without_a_shell() {
        let dir = std::env::temp_dir().join(format!("ergon-privacy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("scontrol");
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$1 $2\" = \"show config\" ] || exit 3\necho 'PrivateData = jobs'\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let r = resolve(PrivateData::Auto, &fake, Duration::from_secs(10));
        assert!(r.private && r.why.contains("PrivateData = jobs"), "{r:?}");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        let t0 = std::time::Instant::now();
        let r = resolve(PrivateData::Auto, &fake, Duration::from_millis(300));
        assert!(r.private && r.why.contains("did not answer"), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modes_follow_privacy_and_group() {
        assert_eq!((Modes::OPEN.dir(), Modes::OPEN.file()), (0o755, 0o644));
        let root_only = Modes {
            private: true,
            gid: None,
        };
        assert_eq!((root_only.dir(), root_only.file()), (0o700, 0o600));
        let group = Modes {
            private: true,
            gid: Some(5),
        };
        assert_eq!((group.dir(), group.file()), (0o750, 0o640));
    }

    #[test]
    fn apply_restricts_only_when_private_and_never_follows_a_symlink() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = std::env::temp_dir().join(format!("ergon-modes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join("m.json");
        std::fs::write(&file, b"{}").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        Modes::OPEN.apply(&file).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o644);
        let own_gid = std::fs::metadata(&file).unwrap().gid();
        let private = Modes {
            private: true,
            gid: Some(own_gid),
        };
        private.apply(&file).unwrap();
        private.apply(&dir).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o640);
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o750);
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(Modes {
            private: true,
            gid: None
        }
        .apply(&link)
        .is_err());
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o640);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
