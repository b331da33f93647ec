//! Private job data on the accounting host ([`ergon_protocol::privacy`]): when private, `ergon
//! run` keeps its state directory, quarantine and SQLite records database readable by root and
//! `private_group` only; and what `ergon report` and `ergon jobs` do for a user who may not read
//! them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use ergon_protocol::privacy::{resolve, Modes, Resolved};

use crate::config::Config;
use crate::records::Location;

/// `private_data` resolved for this host, with `private_group`'s gid.
pub fn modes(config: &Config) -> Result<(Modes, Resolved)> {
    let resolved = resolve(
        config.private_data,
        &config.scontrol,
        Duration::from_secs(config.sacct.timeout_s.max(1)),
    );
    let gid = match &config.private_group {
        None => None,
        Some(g) => Some(group_id(g)?),
    };
    Ok((
        Modes {
            private: resolved.private,
            gid,
        },
        resolved,
    ))
}

/// The gid of group `name` (through NSS: `getent group`, no shell).
fn group_id(name: &str) -> Result<u32> {
    let out = Command::new("getent")
        .args(["group", "--", name])
        .output()
        .context("running getent group")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().split(':').nth(2).map(str::parse::<u32>) {
        Some(Ok(gid)) if out.status.success() => Ok(gid),
        _ => {
            bail!("private_group {name:?} is not a group of this host; create it or remove the key")
        }
    }
}

/// Give the state directory, the quarantine and the SQLite records database (and the files
/// directly in the first two) private data's modes and group; nothing when not private.
/// Symlinks are neither followed nor changed.
pub fn restrict(config: &Config, modes: Modes) -> Result<()> {
    if !modes.private {
        return Ok(());
    }
    let mut paths = Vec::new();
    for dir in [&config.state_dir, &config.quarantine_dir] {
        if !dir.is_dir() {
            continue;
        }
        paths.push(dir.to_path_buf());
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_file() || entry.file_type()?.is_dir() {
                paths.push(entry.path());
            }
        }
    }
    if let Location::Sqlite(db) = config.records_location() {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = db.clone().into_os_string();
            p.push(suffix);
            let p = std::path::PathBuf::from(p);
            if p.is_file() && !paths.contains(&p) {
                paths.push(p);
            }
        }
    }
    for p in paths {
        modes
            .apply(&p)
            .with_context(|| format!("cannot restrict {} (private job data)", p.display()))?;
    }
    Ok(())
}

/// Whether opening `path` is refused by its permissions or its directories' (the caller may not
/// read private job data there).
pub fn denied(path: &Path) -> bool {
    let e = if path.is_dir() {
        std::fs::read_dir(path).err()
    } else {
        std::fs::File::open(path).err()
    };
    e.is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    fn config(dir: &Path, extra: &str) -> Config {
        Config::parse(
            &format!(
                "state_dir = {:?}\nquarantine_dir = {:?}\n{extra}",
                dir.join("state"),
                dir.join("quarantine")
            ),
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn private_state_quarantine_and_records_are_root_and_group_only() {
        let dir = tempfile::tempdir().unwrap();
        let gid = std::fs::metadata(dir.path()).unwrap().gid();
        let c = config(dir.path(), "private_data = \"yes\"\n");
        for d in ["state", "quarantine"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
            std::fs::set_permissions(dir.path().join(d), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        let files = [
            dir.path().join("state/state.json"),
            dir.path().join("state/records.sqlite"),
            dir.path().join("quarantine/c-1-n.json"),
        ];
        for f in &files {
            std::fs::write(f, b"x").unwrap();
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let (modes, why) = modes(&c).unwrap();
        assert!(modes.private && why.why.contains("yes"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        // Not private: nothing changes.
        restrict(&c, Modes::OPEN).unwrap();
        assert_eq!(mode(&files[0]), 0o644);
        restrict(&c, modes).unwrap();
        for f in &files {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        assert_eq!(mode(&dir.path().join("state")), 0o700);
        assert_eq!(mode(&dir.path().join("quarantine")), 0o700);
        let group = Modes {
            private: true,
            gid: Some(gid),
        };
        restrict(&c, group).unwrap();
        assert_eq!(mode(&files[1]), 0o640);
        assert_eq!(mode(&dir.path().join("state")), 0o750);
    }

    #[test]
    fn an_unknown_group_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(
            dir.path(),
            "private_data = \"no\"\nprivate_group = \"no-such-group-ergon\"\n",
        );
        let e = modes(&c).unwrap_err().to_string();
        assert!(e.contains("no-such-group-ergon"), "{e}");
        let e = Config::parse("private_group = \"a b\"\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("private_group"), "{e}");
    }
}
