//! Sealing node directories of the sharded spool at the end of a pipelined run (see
//! [`crate::spool::Sealed`]): a directory whose every manifest is in the ledger, as listed, or
//! of a job before the horizon, is not listed by later runs while its modification time stays
//! the same.

use std::collections::BTreeSet;

use anyhow::Result;

use crate::collect::{ListedFile, SealCandidates};
use crate::ledger::Ledger;
use crate::spool::{mtime_ns, ListedDir, Sealed};
use crate::state::State;

/// What a pipelined run hands to [`seal`].
pub(super) struct ToSeal {
    /// What the scan found of the node directories.
    pub found: SealCandidates,
    /// The manifests the run read of jobs that ended at or before the horizon: never collected
    /// again, so as good as delivered for sealing (they are in no index, and without a seal
    /// every run would read them again).
    pub before_horizon: BTreeSet<String>,
}

/// What [`seal`] did: directories sealed and stale seals forgotten.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SealOutcome {
    pub sealed: usize,
    pub forgotten: usize,
}

/// Seal the candidates whose manifests are each either in the ledger with the size and
/// modification time they were listed with, of a job the state no longer holds (pending, or
/// collected again), or of a job skipped before the horizon, and whose own modification time
/// has not changed since the listing; forget the seals of directories the listing no longer
/// found. Called once the run has moved its delivered jobs into the ledger.
pub(super) fn seal(ledger: &mut Ledger, state: &State, to_seal: ToSeal) -> Result<SealOutcome> {
    let ToSeal {
        found,
        before_horizon,
    } = to_seal;
    // The lookups share one read transaction.
    ledger.begin_read()?;
    let add = sealable(ledger, state, found.candidates, &before_horizon);
    ledger.end_read()?;
    let add = add?;
    let stale: Vec<&str> = found.stale.iter().map(String::as_str).collect();
    let add_ref: Vec<(&str, Sealed)> = add.iter().map(|(p, s)| (p.as_str(), *s)).collect();
    ledger.seal(&add_ref, &stale)?;
    Ok(SealOutcome {
        sealed: add.len(),
        forgotten: stale.len(),
    })
}

/// The candidates that [`seal`] seals, with their seals.
fn sealable(
    ledger: &Ledger,
    state: &State,
    candidates: Vec<(ListedDir, Vec<ListedFile>)>,
    before_horizon: &BTreeSet<String>,
) -> Result<Vec<(String, Sealed)>> {
    let mut add = Vec::new();
    for (dir, files) in candidates {
        if files.len() as u64 != dir.files {
            continue;
        }
        let unchanged =
            std::fs::symlink_metadata(&dir.path).is_ok_and(|m| mtime_ns(&m) == dir.mtime_ns);
        if !unchanged {
            continue;
        }
        let paths: Vec<&str> = files
            .iter()
            .map(|(p, _, _)| p.as_str())
            .filter(|p| !before_horizon.contains(*p))
            .collect();
        let known = ledger.files(&paths)?;
        let all_in = files.iter().all(|(path, size, mtime_ns)| {
            before_horizon.contains(path)
                || known.get(path).is_some_and(|e| {
                    e.size == *size && e.mtime_ns == *mtime_ns && !state.jobs.contains_key(&e.job)
                })
        });
        if all_in {
            add.push((
                dir.path,
                Sealed {
                    mtime_ns: dir.mtime_ns,
                    files: dir.files,
                },
            ));
        }
    }
    Ok(add)
}
