//! Finding and verifying the job's manifests: in the spool directories, or the files given.

use std::path::PathBuf;

use ergon_protocol::manifest::Manifest;

use super::error::PlotError;

fn cluster_suffix(cluster: Option<&str>) -> String {
    cluster
        .map(|c| format!(" on cluster {c}"))
        .unwrap_or_default()
}

/// The verified manifests of `job_id` (on `cluster`, if given) in the spool directories, read as
/// `ergon report` reads them: every `*.json` directly in each directory (names starting with `.`
/// skipped), parsed, kept when it is the job's, then verified. Files that are not manifests of
/// this schema version are skipped; a manifest of the job that fails verification is an error,
/// since the plot and its totals would silently miss a node.
pub fn find_in_spools(
    spools: &[PathBuf],
    cluster: Option<&str>,
    job_id: u32,
) -> Result<Vec<Manifest>, PlotError> {
    let files = crate::spool::find_job(spools, cluster, job_id);
    for p in &files.unreadable {
        tracing::debug!("skipped {p}");
    }
    let problems = files.unverified;
    let found: Vec<Manifest> = files.found.into_iter().map(|(_, m)| m).collect();
    if !problems.is_empty() {
        return Err(PlotError::Unverified { job_id, problems });
    }
    if found.is_empty() {
        let denied: Vec<String> = spools
            .iter()
            .filter(|d| crate::privacy::denied(d))
            .map(|p| p.display().to_string())
            .collect();
        let files_denied = files
            .unreadable
            .iter()
            .any(|p| p.contains("Permission denied"));
        if !denied.is_empty() || files_denied {
            return Err(PlotError::Restricted {
                job_id,
                dirs: if denied.is_empty() {
                    "its manifest".to_owned()
                } else {
                    denied.join(", ")
                },
            });
        }
        return Err(PlotError::NoManifests {
            job_id,
            cluster: cluster_suffix(cluster),
            dirs: spools
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(found)
}

/// Read and verify the manifest files given on the command line; each must be of `job_id` (and
/// `cluster`, if given).
pub fn read_files(
    paths: &[PathBuf],
    cluster: Option<&str>,
    job_id: u32,
) -> Result<Vec<Manifest>, PlotError> {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let bytes = crate::spool::read_manifest(path).map_err(|source| PlotError::Read {
            path: path.clone(),
            source,
        })?;
        let m = match Manifest::from_json(&bytes) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        if m.job.job_id != job_id || cluster.is_some_and(|c| c != m.cluster) {
            return Err(PlotError::OtherJob {
                path: path.clone(),
                got: m.job.job_id,
                cluster: m.cluster,
                want: job_id,
                want_cluster: cluster_suffix(cluster),
            });
        }
        found.push(m);
    }
    if !problems.is_empty() {
        return Err(PlotError::Unverified { job_id, problems });
    }
    if found.is_empty() {
        return Err(PlotError::NoManifests {
            job_id,
            cluster: cluster_suffix(cluster),
            dirs: "the files given".into(),
        });
    }
    Ok(found)
}
