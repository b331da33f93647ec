//! The energy report on the terminal of an interactive job: `srun --energy-report …` run on its
//! own, or `salloc --energy-report`.
//!
//! ergond writes a job's report when the job ends, on the node, into the job's working
//! directory (docs/spank-plugin.md). For a batch job that is the end of its output file; a
//! person who typed `srun --energy-report` or `salloc --energy-report` at a terminal expects to
//! see it there. Both call the plugin's exit hook only once the job's allocation is released
//! (srun at its process exit, after telling slurmctld the job is complete; salloc after
//! relinquishing it): by then the nodes run the epilog and ergond writes the report. So the
//! plugin, in that srun or salloc, waits a bounded time (`report_wait_s`, default 10 s) for the
//! report files of the job to appear in its working directory and prints them on standard
//! error; if they do not come in time (ergond down or busy, a working directory the plugin
//! cannot see) it says where they will be and how to get the figures later.
//!
//! Only the process that made the job's allocation does this: an `srun` inside an allocation
//! (in a batch script or under `salloc`) runs one step of a job that goes on, and `sbatch`
//! returns at submission.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ergon_protocol::ReportFormat;

/// How often the working directory is looked at while waiting.
const POLL: Duration = Duration::from_millis(100);

/// The largest report file shown on the terminal (a text report is a few kB).
const MAX_SHOWN: u64 = 256 * 1024;

/// The report files of `job` in `dir` in `format`: `ergon-<job>.…txt` (or `.json`), whatever
/// follows the job id (the node, for reports from several nodes); sorted by name.
pub fn report_files(dir: &Path, job: u32, format: ReportFormat) -> Vec<PathBuf> {
    let prefix = format!("ergon-{job}.");
    let ext = extension(format);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix)
                && Path::new(name.as_ref()).extension() == Some(OsStr::new(ext))
                && e.file_type().map(|t| t.is_file()).unwrap_or(false)
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

fn extension(format: ReportFormat) -> &'static str {
    match format {
        ReportFormat::Text => "txt",
        ReportFormat::Json => "json",
    }
}

/// What the wait found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Every expected report, complete (non-empty and no longer growing).
    All(Vec<PathBuf>),
    /// What there was when the wait ran out (maybe nothing).
    Partial(Vec<PathBuf>),
}

/// Waits at most `wait` for `nodes` complete report files of `job` in `dir`. A file counts as
/// complete once it is not empty and its size did not change between two looks (ergond's
/// writer creates it and writes the report in one go, then closes it).
pub fn wait_for_reports(
    dir: &Path,
    job: u32,
    format: ReportFormat,
    nodes: usize,
    wait: Duration,
) -> Found {
    let deadline = Instant::now() + wait;
    let mut last: Vec<(PathBuf, u64)> = Vec::new();
    loop {
        let now: Vec<(PathBuf, u64)> = report_files(dir, job, format)
            .into_iter()
            .map(|p| {
                let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                (p, len)
            })
            .collect();
        let complete =
            now.len() >= nodes.max(1) && now.iter().all(|(_, len)| *len > 0) && now == last;
        if complete {
            return Found::All(now.into_iter().map(|(p, _)| p).collect());
        }
        if Instant::now() >= deadline {
            return Found::Partial(now.into_iter().map(|(p, _)| p).collect());
        }
        last = now;
        std::thread::sleep(POLL);
    }
}

/// Shows what [`wait_for_reports`] found on `out`: a text report whole, a JSON report by its
/// path; after a timeout, where the report will be and how to get the figures meanwhile.
pub fn show(
    out: &mut dyn Write,
    found: &Found,
    dir: &Path,
    job: u32,
    format: ReportFormat,
    waited: Duration,
) -> std::io::Result<()> {
    let files = match found {
        Found::All(f) | Found::Partial(f) => f,
    };
    for path in files {
        match format {
            ReportFormat::Text => {
                let mut text = String::new();
                let read = std::fs::File::open(path).and_then(|f| {
                    use std::io::Read;
                    f.take(MAX_SHOWN).read_to_string(&mut text)
                });
                match read {
                    Ok(_) => {
                        out.write_all(text.as_bytes())?;
                        if !text.ends_with('\n') {
                            out.write_all(b"\n")?;
                        }
                    }
                    Err(e) => writeln!(
                        out,
                        "ergon: the energy report of job {job} is {} (cannot read it: {e})",
                        path.display()
                    )?,
                }
            }
            ReportFormat::Json => writeln!(
                out,
                "ergon: the energy report of job {job} (JSON) is {}",
                path.display()
            )?,
        }
    }
    if let Found::Partial(_) = found {
        let what = if files.is_empty() {
            "was not written"
        } else {
            "is not complete"
        };
        writeln!(
            out,
            "ergon: the energy report of job {job} {what} within {} s of the job's end (ergond \
             on the node may be down or busy); it will be in {}/ergon-{job}.*.{}, and \
             `ergon report {job}` shows the job's energy once the accounting has collected it",
            waited.as_secs(),
            dir.display(),
            extension(format),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ergon-terminal-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_this_jobs_reports_of_the_asked_format_are_found() {
        let d = dir("find");
        for name in [
            "ergon-12.txt",
            "ergon-12.n1.txt",
            "ergon-12.json",
            "ergon-123.txt",
            "ergon-1.txt",
            "ergon-12.txt.partial-not-a-report",
            "xergon-12.txt",
        ] {
            std::fs::write(d.join(name), "x").unwrap();
        }
        std::fs::create_dir(d.join("ergon-12.dir.txt")).unwrap();
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(report_files(&d, 12, ReportFormat::Text)),
            ["ergon-12.n1.txt", "ergon-12.txt"]
        );
        assert_eq!(
            names(report_files(&d, 12, ReportFormat::Json)),
            ["ergon-12.json"]
        );
        assert!(report_files(&d.join("missing"), 12, ReportFormat::Text).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_wait_ends_when_every_node_has_a_complete_report() {
        let d = dir("wait");
        let writer = {
            let d = d.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(150));
                std::fs::write(d.join("ergon-7.a.txt"), "node a\n").unwrap();
                std::thread::sleep(Duration::from_millis(150));
                // Created empty first, as the writer does, then filled.
                std::fs::write(d.join("ergon-7.b.txt"), "").unwrap();
                std::thread::sleep(Duration::from_millis(250));
                std::fs::write(d.join("ergon-7.b.txt"), "node b\n").unwrap();
            })
        };
        let t = Instant::now();
        let found = wait_for_reports(&d, 7, ReportFormat::Text, 2, Duration::from_secs(20));
        writer.join().unwrap();
        let Found::All(files) = &found else {
            panic!("{found:?}")
        };
        assert_eq!(files.len(), 2);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let mut out = Vec::new();
        show(
            &mut out,
            &found,
            &d,
            7,
            ReportFormat::Text,
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "node a\nnode b\n");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_report_that_never_comes_ends_the_wait_with_where_it_will_be() {
        let d = dir("never");
        let t = Instant::now();
        let found = wait_for_reports(&d, 9, ReportFormat::Json, 1, Duration::from_millis(300));
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert_eq!(found, Found::Partial(vec![]));
        let mut out = Vec::new();
        show(
            &mut out,
            &found,
            &d,
            9,
            ReportFormat::Json,
            Duration::from_secs(10),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("job 9 was not written within 10 s"), "{text}");
        assert!(
            text.contains(&format!("{}/ergon-9.*.json", d.display())),
            "{text}"
        );
        assert!(text.contains("`ergon report 9`"), "{text}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
