//! Replacing a file so that a reader, or the same program after a crash or power loss, sees
//! either the old contents or the new ones, never a part: a temporary file beside it
//! (`.<name>.tmp`, created fresh, never through a symlink), written and fsync'd, renamed over
//! the name, then the directory fsync'd so the rename itself survives. ergond writes its
//! manifests (the spool's contract with the accounting) and its journal this way, and `ergon`
//! its state and its plots.
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("ergon-durable-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("state.json");
//! ergon_protocol::durable::write(&path, b"{}\n", 0o600)?;
//! assert_eq!(std::fs::read(&path)?, b"{}\n");
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The step of [`write`] that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Creating the temporary file.
    Create,
    /// Writing it.
    Write,
    /// Its fsync.
    Sync,
    /// The rename over the file's name.
    Rename,
    /// The directory's fsync.
    SyncDir,
}

impl Step {
    /// The step as words: `creating`, `writing`, `syncing`, `renaming into place`, `syncing
    /// directory`.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Create => "creating",
            Step::Write => "writing",
            Step::Sync => "syncing",
            Step::Rename => "renaming into place",
            Step::SyncDir => "syncing directory",
        }
    }
}

/// Why a file could not be replaced; the file under its name is then unchanged.
#[derive(Debug, thiserror::Error)]
#[error("{} {}: {source}", step.as_str(), path.display())]
pub struct WriteError {
    /// What failed.
    pub step: Step,
    /// The file (the temporary one for its own steps, the directory for its fsync).
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

/// Replace `path` with `bytes` atomically and durably (see the module documentation); a new
/// file gets permissions `mode` (less the umask). The parent directory must exist.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    write_unsynced(path, bytes, mode)?;
    sync_dir(parent(path))
}

/// As [`write`] without the directory's fsync: the file is complete under its name at once,
/// and survives a crash once [`sync_dir`] of its directory returns. For several files written
/// in a row, which then share one directory fsync.
pub fn write_unsynced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let name = path.file_name().map_or_else(
        || std::borrow::Cow::Borrowed("file"),
        |n| n.to_string_lossy(),
    );
    let tmp = parent(path).join(format!(".{name}.tmp"));
    let at = |step: Step, path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError { step, path, source }
    };
    // One left by a crash is stale; one another writer is using makes that writer fail, not
    // both write into one file.
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(at(Step::Create, &tmp))?;
        f.write_all(bytes).map_err(at(Step::Write, &tmp))?;
        f.sync_all().map_err(at(Step::Sync, &tmp))?;
        std::fs::rename(&tmp, path).map_err(at(Step::Rename, path))
    })();
    if written.is_err() {
        // A part-written copy would only take the space a full disk lacks.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Make the renames done in `dir` durable (fsync the directory).
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| WriteError {
            step: Step::SyncDir,
            path: dir.to_path_buf(),
            source,
        })
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ergon-durable-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn replaces_the_file_with_its_mode_and_leaves_no_temporary() {
        let dir = scratch("replace");
        let path = dir.join("a.json");
        write(&path, b"one", 0o600).unwrap();
        write(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stale_temporary_is_replaced_and_a_symlinked_one_is_not_followed() {
        let dir = scratch("stale");
        let path = dir.join("j");
        std::fs::write(dir.join(".j.tmp"), b"left by a crash").unwrap();
        write(&path, b"new", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        // A symlink planted as the temporary: removed, never written through.
        let victim = dir.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(".j.tmp")).unwrap();
        write(&path, b"newer", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(&path).unwrap(), b"newer");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failure_names_its_step_and_leaves_the_file_as_it_was() {
        let dir = scratch("fail");
        let path = dir.join("missing-dir/f");
        let e = write(&path, b"x", 0o644).unwrap_err();
        assert_eq!(e.step, Step::Create);
        assert!(e.to_string().starts_with("creating "), "{e}");
        // The name is a directory: the rename fails, the temporary is gone.
        let taken = dir.join("taken");
        std::fs::create_dir(&taken).unwrap();
        std::fs::write(taken.join("inside"), b"").unwrap();
        let e = write(&taken, b"x", 0o644).unwrap_err();
        assert_eq!(e.step, Step::Rename, "{e}");
        assert!(!dir.join(".taken.tmp").exists());
        assert!(taken.join("inside").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
