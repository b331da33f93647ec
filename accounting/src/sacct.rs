//! The sacct record: written with `sacctmgr modify job`, merged with foreign content, verified by
//! reading back with `sacct`.
//!
//! Measured on Slurm 22.05 (see docs/accounting.md): one `sacctmgr modify job` costs about
//! 0.27 s (≈ 3.7 jobs/s one after another); `where jobid=a,b,c` sets one value for many jobs
//! (≈ 36 jobs/s for 10 jobs) but ergon's records differ per job, so it does not apply; several
//! sacctmgr processes at once do scale (through ergon, verified: 4 at once ≈ 13 jobs/s, 8 ≈ 24,
//! 16 ≈ 36), and one `sacct -j a,b,…` reads
//! back a whole chunk in ~0.1 s. So ergon reads a chunk's current values with one sacct call, runs
//! `parallel` sacctmgr processes, and verifies the chunk with one more sacct call.
//!
//! sacctmgr lowercases the whole value and strips or cuts at quotes. Foreign content that has
//! uppercase letters or quotes therefore cannot go through sacctmgr unchanged: by default
//! ([`ForeignUnsafe::Skip`]) such a job's sacct record is not written (marked skipped, shown by
//! `ergon status`); with `foreign_unsafe = "lowercase"` it is written and the foreign content is
//! stored lowercased.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ergon_protocol::record::{find_in_field, merge_into_field, strip_from_field, JobRecord};

use crate::config::{ForeignUnsafe, SacctConfig, SacctField};
use crate::consumed_energy::{ConsumedEnergyWriter, EnergyJob};

/// One job to write.
#[derive(Debug, Clone)]
pub struct SacctJob {
    /// Cluster name.
    pub cluster: String,
    /// Job id.
    pub job_id: u32,
    /// The record.
    pub record: JobRecord,
}

/// What happened to one job.
#[derive(Debug, Clone, PartialEq)]
pub enum SacctOutcome {
    /// The field now holds the record (read back and checked). `already` when it did before.
    Written {
        /// Nothing had to be written.
        already: bool,
    },
    /// Not written on purpose.
    Skipped(String),
    /// Not written this time; retry in a later run.
    Failed(String),
}

/// Whether foreign content would be changed by sacctmgr.
pub fn foreign_is_unsafe(foreign: &str) -> bool {
    foreign
        .chars()
        .any(|c| c.is_uppercase() || c == '"' || c == '\'')
}

/// Reads and writes one comment field through the Slurm client programs.
#[derive(Debug, Clone)]
pub struct Sacct {
    config: SacctConfig,
}

impl Sacct {
    /// A writer with these settings.
    pub fn new(config: SacctConfig) -> Self {
        Sacct { config }
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_s)
    }

    /// The field this writer uses.
    pub fn field(&self) -> SacctField {
        self.config.field
    }

    /// The current value of the field for each of `job_ids` on `cluster` (one sacct call). Jobs
    /// sacct does not list are absent.
    pub fn read(
        &self,
        cluster: Option<&str>,
        job_ids: &[u32],
    ) -> Result<BTreeMap<u32, String>, String> {
        let ids: Vec<String> = job_ids.iter().map(u32::to_string).collect();
        let mut cmd = Command::new(&self.config.sacct);
        cmd.args(["-n", "-P", "-X", "-D"]);
        if let Some(c) = cluster {
            cmd.args(["-M", c]);
        }
        cmd.args(["-j", &ids.join(",")])
            .args(["-o", &format!("JobIDRaw,{}", self.config.field.name())]);
        let out = run(&mut cmd, &self.config.sacct, self.timeout())?;
        let mut values = BTreeMap::new();
        for line in out.lines() {
            // JobIDRaw never holds '|'; the field is the rest of the line.
            if let Some((id, value)) = line.split_once('|') {
                if let Ok(id) = id.trim().parse::<u32>() {
                    values.entry(id).or_insert_with(|| value.to_owned());
                }
            }
        }
        Ok(values)
    }

    fn modify(&self, cluster: &str, job_id: u32, value: &str) -> Result<(), String> {
        let mut cmd = Command::new(&self.config.sacctmgr);
        cmd.args([
            "-i",
            "modify",
            "job",
            "where",
            &format!("jobid={job_id}"),
            &format!("cluster={cluster}"),
            "set",
            &format!("{}={value}", self.config.field.name()),
        ]);
        run(&mut cmd, &self.config.sacctmgr, self.timeout()).map(|_| ())
    }

    /// Write the records of `jobs` (all of one cluster), verify them, and say what happened to
    /// each, in order. `progress` is called once per finished job. `Err` when the first read of
    /// the jobs' current values fails (sacct or slurmdbd down, hung, or refusing): nothing was
    /// written, and the caller should not try more jobs of the cluster this run.
    pub fn write(
        &self,
        cluster: &str,
        jobs: &[SacctJob],
        progress: &dyn Fn(),
    ) -> Result<Vec<SacctOutcome>, String> {
        let mut outcomes: Vec<Option<SacctOutcome>> = vec![None; jobs.len()];
        let ids: Vec<u32> = jobs.iter().map(|j| j.job_id).collect();
        let mut last_error: BTreeMap<usize, String> = BTreeMap::new();
        // The total of the record each job had before this run (for ConsumedEnergy).
        let mut previous: BTreeMap<usize, u64> = BTreeMap::new();
        for round in 0..self.config.verify_attempts {
            let current = match self.read(Some(cluster), &ids) {
                Ok(c) => c,
                Err(e) if round == 0 => return Err(e),
                Err(e) => {
                    for o in outcomes.iter_mut().filter(|o| o.is_none()) {
                        *o = Some(SacctOutcome::Failed(e.clone()));
                        progress();
                    }
                    break;
                }
            };
            // Decide, per job still open, what to write.
            let mut to_write: Vec<(usize, String)> = Vec::new();
            for (i, job) in jobs.iter().enumerate() {
                if outcomes[i].is_some() {
                    continue;
                }
                let Some(existing) = current.get(&job.job_id) else {
                    last_error.insert(
                        i,
                        format!(
                            "job {} is not in sacct on cluster {cluster} (yet)",
                            job.job_id
                        ),
                    );
                    continue;
                };
                let want = job.record.normalized();
                if round == 0 {
                    if let Some(Ok(old)) = find_in_field(existing) {
                        previous.insert(i, old.energy_j);
                    }
                }
                if find_in_field(existing) == Some(Ok(want.clone())) {
                    outcomes[i] = Some(SacctOutcome::Written {
                        already: round == 0,
                    });
                    progress();
                    continue;
                }
                let foreign = strip_from_field(existing);
                if foreign_is_unsafe(&foreign) && self.config.foreign_unsafe == ForeignUnsafe::Skip
                {
                    outcomes[i] = Some(SacctOutcome::Skipped(format!(
                        "{} holds foreign content with uppercase letters or quotes ({:?}) that sacctmgr would alter; not written (set sacct.foreign_unsafe = \"lowercase\" to write anyway, or use another sacct.field)",
                        self.config.field.name(),
                        foreign.chars().take(60).collect::<String>()
                    )));
                    progress();
                    continue;
                }
                to_write.push((i, merge_into_field(existing, &job.record)));
            }
            if to_write.is_empty() {
                break;
            }
            // Run `parallel` sacctmgr processes at a time.
            for chunk in to_write.chunks(self.config.parallel) {
                let results: Vec<(usize, Result<(), String>)> = std::thread::scope(|s| {
                    let handles: Vec<_> = chunk
                        .iter()
                        .map(|(i, value)| {
                            let job = &jobs[*i];
                            (*i, s.spawn(move || self.modify(cluster, job.job_id, value)))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|(i, h)| {
                            (
                                i,
                                h.join()
                                    .unwrap_or_else(|_| Err("sacctmgr thread panicked".into())),
                            )
                        })
                        .collect()
                });
                for (i, r) in results {
                    if let Err(e) = r {
                        last_error.insert(i, e);
                    }
                }
            }
            // The next round's read verifies; after the last round verify once more.
            if round + 1 == self.config.verify_attempts {
                if let Ok(back) = self.read(Some(cluster), &ids) {
                    for (i, _) in &to_write {
                        let ok = back.get(&jobs[*i].job_id).is_some_and(|v| {
                            find_in_field(v) == Some(Ok(jobs[*i].record.normalized()))
                        });
                        if ok {
                            outcomes[*i] = Some(SacctOutcome::Written { already: false });
                            progress();
                        }
                    }
                }
            }
        }
        self.write_consumed_energy(cluster, jobs, &previous, &mut outcomes);
        Ok(outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.unwrap_or_else(|| {
                    progress();
                    SacctOutcome::Failed(last_error.remove(&i).unwrap_or_else(|| {
                        format!(
                            "the record did not read back from sacct after {} attempts",
                            self.config.verify_attempts
                        )
                    }))
                })
            })
            .collect())
    }
}

impl Sacct {
    /// For the jobs whose record is in place, Slurm's own `ConsumedEnergy` too where the release
    /// supports it ([`crate::consumed_energy`]); a job whose energy did not get there is left
    /// pending (its record is found in place next time, and the energy tried again).
    fn write_consumed_energy(
        &self,
        cluster: &str,
        jobs: &[SacctJob],
        previous: &BTreeMap<usize, u64>,
        outcomes: &mut [Option<SacctOutcome>],
    ) {
        let written: Vec<(usize, EnergyJob)> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Some(SacctOutcome::Written { .. })))
            .map(|(i, _)| {
                let job = &jobs[i];
                (
                    i,
                    (job.job_id, job.record.energy_j, previous.get(&i).copied()),
                )
            })
            .collect();
        if written.is_empty() {
            return;
        }
        let writer = ConsumedEnergyWriter::new(&self.config);
        let list: Vec<EnergyJob> = written.iter().map(|w| w.1).collect();
        let outcome = writer.write(cluster, &list);
        for (i, (id, _, _)) in written {
            if let Some(reason) = outcome.failed.get(&id) {
                outcomes[i] = Some(SacctOutcome::Failed(reason.clone()));
            }
        }
    }
}

/// Run `cmd` to its end, at most `timeout`: its stdout, or what went wrong. A program still
/// running after `timeout` is killed (a hung slurmdbd makes sacct and sacctmgr wait 45 s and
/// more, and a run holding the lock blocks every later run).
fn run(cmd: &mut Command, program: &Path, timeout: Duration) -> Result<String, String> {
    use std::io::Read as _;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run {}: {e}; is Slurm's client installed and on PATH?",
                program.display()
            )
        })?;
    // Read both pipes while waiting, so that a large output cannot block the child.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not answer within {} s (sacct.timeout_s) and was stopped; is slurmdbd responding?",
                    program.display(),
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for {}: {e}", program.display())),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            program.display(),
            status,
            String::from_utf8_lossy(&stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_foreign_content_is_detected() {
        assert!(foreign_is_unsafe("JS1:H4sI"));
        assert!(foreign_is_unsafe("a\"b"));
        assert!(!foreign_is_unsafe("js1:h4si; x=1"));
        assert!(!foreign_is_unsafe(""));
    }
}
