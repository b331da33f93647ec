//! Writing manifests into the spool atomically ([`ergon_protocol::durable`]: a temporary file in
//! the spool itself, fsync, rename over the final name, fsync the directory). A reader (the
//! accounting run) therefore sees either no manifest or a complete one, also after a crash or
//! power loss. Several manifests written in a row may share one directory fsync
//! ([`write_manifest_file`], then [`sync_dir`]): none of them counts as written before it.
//!
//! File name: `<cluster>-<job id>-<node>.json`, each name reduced to `[A-Za-z0-9._-]` (other
//! bytes become `_`) so that no value from the plugin can name a path outside the spool.

use std::path::{Path, PathBuf};

use ergon_protocol::{durable, Manifest};

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

/// Write the (sealed) manifest into `dir` atomically and durably; returns its path. Creates
/// `dir` if needed.
pub fn write_manifest(dir: &Path, m: &Manifest) -> anyhow::Result<PathBuf> {
    let path = write_manifest_file(dir, m)?;
    sync_dir(dir)?;
    Ok(path)
}

/// Make the renames done in `dir` durable (fsync the directory).
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    durable::sync_dir(dir)
        .with_context(|| format!("cannot fsync the spool directory {}", dir.display()))
}

/// As [`write_manifest`] but without the directory fsync: the file is complete under its final
/// name, and durable once [`sync_dir`] returns.
pub fn write_manifest_file(dir: &Path, m: &Manifest) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let json = m.to_json().context("cannot serialise the manifest")?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the spool directory {}", dir.display()))?;
    let path = dir.join(file_name(m));
    durable::write_unsynced(&path, &json, 0o644).with_context(|| {
        format!(
            "cannot write manifest {}; check that ergond may write to spool_dir",
            path.display()
        )
    })?;
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
}
