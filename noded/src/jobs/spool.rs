//! Writing manifests into the spool atomically ([`ergon_protocol::durable`]: a temporary file in
//! the spool itself, fsync, rename over the final name, fsync the directory). A reader (the
//! accounting run) therefore sees either no manifest or a complete one, also after a crash or
//! power loss. Several manifests written in a row may share one directory fsync
//! ([`write_manifest_file`], then [`sync_dir`]): none of them counts as written before it.
//!
//! File name: `<cluster>-<job id>-<node>.json`, each name reduced to `[A-Za-z0-9._-]` (other
//! bytes become `_`) so that no value from the plugin can name a path outside the spool.
//!
//! Layout ([`Layout`]): `flat`, every file directly in the spool; or `sharded`,
//! `<spool>/<YYYY-MM-DD>/<node>/<name>.json.gz` (the job's end day in UTC, the sanitised node
//! name, gzip), so that no directory of a large site's shared spool holds more than one node's
//! manifests of one day. A directory created for it is made durable (its parent fsynced) before
//! a manifest in it counts as written.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use ergon_protocol::privacy::Modes;
use ergon_protocol::{durable, Manifest};
use serde::Deserialize;

/// How manifests are laid out in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `<spool>/<cluster>-<job>-<node>.json`.
    Flat,
    /// `<spool>/<YYYY-MM-DD>/<node>/<cluster>-<job>-<node>.json.gz`.
    Sharded,
}

/// `YYYY-MM-DD` (UTC) of Unix ns.
pub fn day(unix_ns: u64) -> String {
    let days = (unix_ns / 1_000_000_000 / 86_400) as i64;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The directory a manifest goes into.
pub fn manifest_dir(spool: &Path, layout: Layout, m: &Manifest) -> PathBuf {
    match layout {
        Layout::Flat => spool.to_path_buf(),
        Layout::Sharded => spool.join(day(m.end_unix_ns)).join(sanitize(&m.node)),
    }
}

/// `s` with every byte outside `[A-Za-z0-9._-]` replaced by `_`, never empty or starting with a
/// dot.
fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with('.') {
        out.insert(0, '_');
    }
    out
}

/// The manifest's file name in the spool.
pub fn file_name(m: &Manifest) -> String {
    format!(
        "{}-{}-{}.json",
        sanitize(&m.cluster),
        m.job.job_id,
        sanitize(&m.node)
    )
}

/// Write the (sealed) manifest into the spool `dir` atomically and durably; returns its path.
/// Creates the directories needed. `modes`: private data's modes and group
/// ([`ergon_protocol::privacy`]), given to every directory created and to the file.
pub fn write_manifest(
    dir: &Path,
    layout: Layout,
    modes: Modes,
    m: &Manifest,
) -> anyhow::Result<PathBuf> {
    let path = write_manifest_file(dir, layout, modes, m)?;
    sync_dir(path.parent().unwrap_or(dir))?;
    Ok(path)
}

/// Make the renames done in `dir` durable (fsync the directory).
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    durable::sync_dir(dir)
        .with_context(|| format!("cannot fsync the spool directory {}", dir.display()))
}

/// As [`write_manifest`] but without the fsync of the file's directory: the file is complete
/// under its final name, and durable once [`sync_dir`] of its parent returns.
pub fn write_manifest_file(
    spool: &Path,
    layout: Layout,
    modes: Modes,
    m: &Manifest,
) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let json = m.to_json().context("cannot serialise the manifest")?;
    let dir = manifest_dir(spool, layout, m);
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the spool directory {}", dir.display()))?;
        // The new directories' names are durable once their parents are synced; each gets
        // private data's mode and group (a day's directory made by another node's ergond on a
        // shared spool is given them again, which changes nothing).
        let mut at = dir.as_path();
        while at != spool {
            modes
                .apply(at)
                .with_context(|| format!("cannot restrict the spool directory {}", at.display()))?;
            let Some(parent) = at.parent() else { break };
            sync_dir(parent)?;
            at = parent;
        }
    }
    let (name, bytes) = match layout {
        Layout::Flat => (file_name(m), json),
        Layout::Sharded => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&json)
                .and_then(|()| gz.finish())
                .map(|b| (format!("{}.gz", file_name(m)), b))
                .context("cannot compress the manifest")?
        }
    };
    let path = dir.join(name);
    durable::write_unsynced(&path, &bytes, modes.file()).with_context(|| {
        format!(
            "cannot write manifest {}; check that ergond may write to spool_dir",
            path.display()
        )
    })?;
    // Created 0600/0640 as root's: the group comes after, never a wider mode.
    modes
        .apply(&path)
        .with_context(|| format!("cannot give manifest {} its group", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_names_inside_the_spool() {
        assert_eq!(sanitize("node-1.a_b"), "node-1.a_b");
        assert_eq!(sanitize("../../etc"), "_.._.._etc");
        assert_eq!(sanitize(""), "_");
        assert_eq!(sanitize(".hidden"), "_.hidden");
        assert_eq!(sanitize("a/b c"), "a_b_c");
    }

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(1_709_251_199_000_000_000), "2024-02-29");
        assert_eq!(day(1_709_251_200_000_000_000), "2024-03-01");
    }

    /// The sharded layout: the job's end day, the node, gzip; the flat layout as before. Both
    /// read back to the same manifest.
    #[test]
    fn sharded_manifests_go_under_day_and_node_compressed() {
        use std::io::Read as _;
        let dir = tempfile::tempdir().unwrap();
        let m = ergon_protocol::testing::ManifestBuilder::new("c/x", 42, "n1/../a")
            .ended(1_709_251_199_000_000_000, 100)
            .socket(1.0, None)
            .build();
        let flat = write_manifest(dir.path(), Layout::Flat, Modes::OPEN, &m).unwrap();
        assert_eq!(flat, dir.path().join("c_x-42-n1_.._a.json"));
        let sharded = write_manifest(dir.path(), Layout::Sharded, Modes::OPEN, &m).unwrap();
        assert_eq!(
            sharded,
            dir.path().join("2024-02-29/n1_.._a/c_x-42-n1_.._a.json.gz")
        );
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&sharded).unwrap())
            .read_to_end(&mut json)
            .unwrap();
        assert_eq!(json, std::fs::read(&flat).unwrap());
        assert_eq!(Manifest::from_json(&json).unwrap(), m);
    }

    /// Private: the sharded layout's new directories and the manifest get private modes and
    /// the group; not private: today's 0644 file and default directories.
    #[test]
    fn private_manifests_and_their_directories_are_not_world_readable() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let gid = std::fs::metadata(dir.path()).unwrap().gid();
        let m = ergon_protocol::testing::ManifestBuilder::new("c", 7, "n1")
            .ended(1_709_251_199_000_000_000, 100)
            .socket(1.0, None)
            .build();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        let open = write_manifest(dir.path(), Layout::Flat, Modes::OPEN, &m).unwrap();
        assert_eq!(mode(&open), 0o644);
        let private = Modes {
            private: true,
            gid: Some(gid),
        };
        let p = write_manifest(dir.path(), Layout::Sharded, private, &m).unwrap();
        assert_eq!(mode(&p), 0o640);
        assert_eq!(mode(p.parent().unwrap()), 0o750);
        assert_eq!(mode(p.parent().unwrap().parent().unwrap()), 0o750);
        assert_eq!(std::fs::metadata(&p).unwrap().gid(), gid);
        let root_only = Modes {
            private: true,
            gid: None,
        };
        std::fs::remove_dir_all(dir.path().join("2024-02-29")).unwrap();
        let p = write_manifest(dir.path(), Layout::Sharded, root_only, &m).unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
    }
}
