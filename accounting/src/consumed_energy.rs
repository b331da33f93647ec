//! Slurm's own energy field: a job's `ConsumedEnergy` (TRES `energy`), set to ergon's figure.
//!
//! From Slurm 25.11 on, `sacctmgr modify job where jobid=N set TRES=energy=J` sets a TRES of a
//! job that has already completed (sacctmgr(1) of 26.05: "Use to set or modify a TRES on job(s)
//! in the accounting database that have already completed. WARNING: This is permanent, the
//! original value will be lost afterwards."). Checked against a real 26.05 slurmdbd: afterwards
//! `sacct -o ConsumedEnergy,ConsumedEnergyRaw` shows the value, and `AllocTRES` lists
//! `energy=J`, which is what `sreport` and seff-style tools read.
//!
//! So where sacctmgr is 25.11 or later, every job whose `ergon1` record was written gets its
//! total energy (joules) written there too, and read back like the record. What Slurm measured
//! itself (a site that also runs an `AcctGatherEnergyType` plugin) is never replaced silently:
//! with the default `consumed_energy = "auto"` a job that already has a non-zero
//! `ConsumedEnergy` keeps it, and the run says how many did; `"overwrite"` replaces it, `"off"`
//! never writes. Older sacctmgr cannot do it at all: one log line per run says so.

use std::collections::BTreeMap;
use std::process::Command;

use crate::config::{ConsumedEnergy, SacctConfig};

/// The first Slurm release whose sacctmgr sets TRES on completed jobs.
pub const FIRST_RELEASE: (u32, u32) = (25, 11);

/// Parses `sacctmgr --version` output (`slurm 25.11.0`, Debian's `slurm-wlm 26.05.5`) into
/// `(major, minor)`.
pub fn parse_version(text: &str) -> Option<(u32, u32)> {
    let word = text.split_whitespace().last()?;
    let mut parts = word.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// One job to write: its id, ergon's total in joules, and the total of the ergon1 record it had
/// before this run.
pub type EnergyJob = (u32, u64, Option<u64>);

/// What ergon may do with one job's `ConsumedEnergyRaw`, as sacct shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It already holds ergon's figure.
    Done,
    /// Write ergon's figure.
    Write,
    /// Slurm measured the job itself (another figure is there) and the mode keeps it.
    KeepSlurms(u64),
}

/// Decides for one job: `current` is sacct's `ConsumedEnergyRaw` (empty or `0` when Slurm has
/// no energy for the job), `ours` ergon's total in joules, `previous` the total of the ergon1
/// record the job had before this run (a figure ergon wrote itself, replaced when it changed).
pub fn decide(mode: ConsumedEnergy, current: &str, ours: u64, previous: Option<u64>) -> Decision {
    let current = current.trim().parse::<u64>().unwrap_or(0);
    if current == ours {
        Decision::Done
    } else if current == 0 || previous == Some(current) || mode == ConsumedEnergy::Overwrite {
        Decision::Write
    } else {
        Decision::KeepSlurms(current)
    }
}

/// What happened to the jobs of one batch.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Jobs that failed (their sacct record must be retried), with the reason.
    pub failed: BTreeMap<u32, String>,
    /// Jobs that keep Slurm's own figure.
    pub kept_slurms: usize,
    /// Jobs whose `ConsumedEnergy` holds ergon's figure now.
    pub written: usize,
}

/// Writes ergon's energy into `ConsumedEnergy` for the jobs of one cluster.
#[derive(Debug)]
pub struct ConsumedEnergyWriter<'a> {
    config: &'a SacctConfig,
}

/// The sacctmgr release, asked once per process (`None` inside when it could not be told), so
/// that a run logs at most one line about it.
static RELEASE: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();

impl<'a> ConsumedEnergyWriter<'a> {
    /// A writer with the sacct settings.
    pub fn new(config: &'a SacctConfig) -> Self {
        ConsumedEnergyWriter { config }
    }

    /// Whether this Slurm can take it (asked once: `sacctmgr --version`); logs why not, once.
    pub fn supported(&self) -> bool {
        if self.config.consumed_energy == ConsumedEnergy::Off {
            return false;
        }
        let release = *RELEASE.get_or_init(|| {
            let out = Command::new(&self.config.sacctmgr).arg("--version").output();
            let release = out
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| parse_version(&String::from_utf8_lossy(&o.stdout)));
            match release {
                Some(r) if r >= FIRST_RELEASE => {}
                Some((major, minor)) => tracing::info!(
                    "sacct: ConsumedEnergy not written: sacctmgr {major}.{minor:02} cannot set a finished job's energy (Slurm 25.11 and later can); ergon's figure is in the job's ergon1 record"
                ),
                None => tracing::warn!(
                    "sacct: ConsumedEnergy not written: `{} --version` did not tell the Slurm release",
                    self.config.sacctmgr.display()
                ),
            }
            release
        });
        release.is_some_and(|r| r >= FIRST_RELEASE)
    }

    /// Current `ConsumedEnergyRaw` of `job_ids` (one sacct call).
    fn read(&self, cluster: &str, job_ids: &[u32]) -> Result<BTreeMap<u32, String>, String> {
        let ids: Vec<String> = job_ids.iter().map(u32::to_string).collect();
        let out = Command::new(&self.config.sacct)
            .args(["-n", "-P", "-X", "-D", "-M", cluster, "-j", &ids.join(",")])
            .args(["-o", "JobIDRaw,ConsumedEnergyRaw"])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.config.sacct.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}): {}",
                self.config.sacct.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let mut values = BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((id, value)) = line.split_once('|') {
                if let Ok(id) = id.trim().parse::<u32>() {
                    values.entry(id).or_insert_with(|| value.trim().to_owned());
                }
            }
        }
        Ok(values)
    }

    fn modify(&self, cluster: &str, job_id: u32, joules: u64) -> Result<(), String> {
        let out = Command::new(&self.config.sacctmgr)
            .args(["-i", "modify", "job", "where"])
            .arg(format!("jobid={job_id}"))
            .arg(format!("cluster={cluster}"))
            .arg("set")
            .arg(format!("TRES=energy={joules}"))
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.config.sacctmgr.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} modify job {job_id} set TRES=energy={joules} failed ({}): {}",
                self.config.sacctmgr.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Writes `(job id, joules, previous)` of one cluster (`previous`: the total of the job's
    /// ergon1 record before this run) and verifies by reading back. Jobs that fail are named in
    /// the outcome; the caller leaves their sacct record pending.
    pub fn write(&self, cluster: &str, jobs: &[EnergyJob]) -> Outcome {
        let mut outcome = Outcome::default();
        if jobs.is_empty() || !self.supported() {
            return outcome;
        }
        let ids: Vec<u32> = jobs.iter().map(|j| j.0).collect();
        let current = match self.read(cluster, &ids) {
            Ok(c) => c,
            Err(e) => {
                for id in ids {
                    outcome.failed.insert(id, format!("ConsumedEnergy: {e}"));
                }
                return outcome;
            }
        };
        let mut to_write = Vec::new();
        for &(id, joules, previous) in jobs {
            let now = current.get(&id).map(String::as_str).unwrap_or("");
            match decide(self.config.consumed_energy, now, joules, previous) {
                Decision::Done => outcome.written += 1,
                Decision::Write => to_write.push((id, joules)),
                Decision::KeepSlurms(theirs) => {
                    tracing::debug!(
                        "sacct: job {id}: ConsumedEnergy keeps Slurm's own {theirs} J (ergon: {joules} J)"
                    );
                    outcome.kept_slurms += 1;
                }
            }
        }
        if outcome.kept_slurms > 0 {
            tracing::warn!(
                "sacct: {} job(s) keep the ConsumedEnergy Slurm measured itself (an AcctGatherEnergyType plugin); ergon's figure is in their ergon1 record (sacct.consumed_energy = \"overwrite\" replaces Slurm's)",
                outcome.kept_slurms
            );
        }
        for chunk in to_write.chunks(self.config.parallel.max(1)) {
            let results: Vec<(u32, Result<(), String>)> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|&(id, joules)| (id, s.spawn(move || self.modify(cluster, id, joules))))
                    .collect();
                handles
                    .into_iter()
                    .map(|(id, h)| {
                        (
                            id,
                            h.join()
                                .unwrap_or_else(|_| Err("sacctmgr thread panicked".into())),
                        )
                    })
                    .collect()
            });
            for (id, r) in results {
                if let Err(e) = r {
                    outcome.failed.insert(id, format!("ConsumedEnergy: {e}"));
                }
            }
        }
        let written: Vec<u32> = to_write
            .iter()
            .map(|j| j.0)
            .filter(|id| !outcome.failed.contains_key(id))
            .collect();
        if written.is_empty() {
            return outcome;
        }
        match self.read(cluster, &written) {
            Ok(back) => {
                for &(id, joules) in to_write.iter().filter(|j| written.contains(&j.0)) {
                    let got = back.get(&id).map(String::as_str).unwrap_or("");
                    if got.trim().parse::<u64>() == Ok(joules) {
                        outcome.written += 1;
                    } else {
                        outcome.failed.insert(
                            id,
                            format!("ConsumedEnergy reads back {got:?}, not {joules} J"),
                        );
                    }
                }
            }
            Err(e) => {
                for id in written {
                    outcome.failed.insert(id, format!("ConsumedEnergy: {e}"));
                }
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("slurm 25.11.0\n"), Some((25, 11)));
        assert_eq!(parse_version("slurm-wlm 26.05.5\n"), Some((26, 5)));
        assert_eq!(parse_version("slurm-wlm 22.05.8"), Some((22, 5)));
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("garbage"), None);
        assert!(Some((26, 5)) >= Some(FIRST_RELEASE));
        assert!((25, 5) < FIRST_RELEASE);
    }

    #[test]
    fn slurms_own_figure_is_kept_unless_asked() {
        use ConsumedEnergy::*;
        assert_eq!(decide(Auto, "", 500, None), Decision::Write);
        assert_eq!(decide(Auto, "0", 500, None), Decision::Write);
        assert_eq!(decide(Auto, "500", 500, None), Decision::Done);
        assert_eq!(decide(Auto, "812", 500, None), Decision::KeepSlurms(812));
        // 812 J was ergon's own earlier figure (a late manifest changed the job's total).
        assert_eq!(decide(Auto, "812", 500, Some(812)), Decision::Write);
        assert_eq!(
            decide(Auto, "812", 500, Some(700)),
            Decision::KeepSlurms(812)
        );
        assert_eq!(decide(Overwrite, "812", 500, None), Decision::Write);
        assert_eq!(decide(Overwrite, "500", 500, None), Decision::Done);
    }
}
