//! Private job data (`private_data`) against the real cluster, with jobs of two unprivileged
//! users (`ergontest` and `ergontest2`, created by `scripts/slurm-cluster`).
//!
//! The cluster decides what is expected: `scripts/test` runs this file in the default round
//! (Slurm without `PrivateData`) and again on a cluster of its own brought up with
//! `ERGON_CLUSTER_PRIVATE_DATA=jobs,usage,accounts` (`PrivateData` in slurm.conf and
//! slurmdbd.conf).
//!
//! - `auto_follows_slurms_private_data`: ergond and `ergon run` with the default
//!   `private_data = "auto"` read `scontrol show config`: with PrivateData the spool, the
//!   manifest, the state directory and the records database are root's only, and the user's
//!   report file is 0600; without it, the spool and manifests are world-readable as always.
//! - `a_user_sees_their_own_jobs_energy_and_no_one_elses` (PrivateData only): user A's job;
//!   user B can neither read A's manifest nor get A's energy from `ergon report` or `ergon
//!   jobs` (no figure, no file name, no stack trace); A gets their own job's energy from sacct
//!   (the record `ergon run` wrote) and is told why the detailed view is not available; root
//!   sees the job in full.
//! - `private_data_no_keeps_job_data_open`: `private_data = "no"` on a PrivateData cluster:
//!   manifests are 0644 in an open spool and user B reads A's energy from them, as before the
//!   setting existed.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ergon_protocol::{read_frame, write_frame, Manifest, Reply, Request};
use ergon_testkit::{PowercapLayout, PowercapTree};
use ergon_tests::{cluster, scratch_dir, target_dir, wait_for, wait_for_file, Cluster};

/// The plugin's socket is one per cluster: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The second unprivileged user (`scripts/slurm-cluster` creates it).
fn second_user() -> String {
    std::env::var("ERGON_CLUSTER_TEST_USER2").unwrap_or_else(|_| "ergontest2".into())
}

/// Whether the cluster runs with a `PrivateData` that makes job data private.
fn slurm_private(c: &Cluster) -> Result<bool> {
    let out = c.run("scontrol", ["show", "config"])?;
    let text = String::from_utf8(out.stdout)?;
    let line = ergon_protocol::privacy::private_data_line(&text)
        .context("scontrol show config has no PrivateData line")?;
    Ok(ergon_protocol::privacy::is_private(line))
}

/// The real ergond on four fake GPUs (100 W each) and a static RAPL tree, killed on drop.
struct Ergond {
    child: Child,
    socket: PathBuf,
    spool: PathBuf,
    log: PathBuf,
}

impl Ergond {
    fn start(c: &Cluster, dir: &Path, extra: &str) -> Result<Ergond> {
        use std::os::unix::fs::PermissionsExt as _;
        let built = target_dir().join("debug/libnvidia_ml.so");
        ensure!(built.exists(), "{} is missing", built.display());
        let lib = dir.join("nvml/libnvidia-ml.so.1");
        std::fs::create_dir_all(lib.parent().unwrap())?;
        std::fs::copy(&built, &lib)?;
        let gpus: Vec<serde_json::Value> = (0..4u32)
            .map(|i| {
                let rdev = std::fs::metadata(c.dir.join(format!("dev/fakegpu{i}")))
                    .map(|m| m.rdev())
                    .unwrap_or(0);
                let minor = ((rdev & 0xff) | ((rdev >> 12) & !0xff)) as u32;
                serde_json::json!({
                    "uuid": format!("GPU-{minor:08x}-0000-4000-8000-00000000000{i}"),
                    "name": "Fake privacy GPU", "minor": minor,
                    "profile": {"kind": "constant", "watts": 100.0},
                    "update_period_ms": 20.0,
                })
            })
            .collect();
        std::fs::write(
            format!("{}.scenario.json", lib.display()),
            serde_json::to_vec(&serde_json::json!({
                "start_monotonic_ns": ergond::clock::monotonic_ns(),
                "gpus": gpus,
            }))?,
        )?;
        let powercap = dir.join("powercap");
        PowercapTree::create(
            &powercap,
            &PowercapLayout::IntelServer { sockets: 1 }.zones(),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // The spool's parent is open to all, so that only the spool's own mode decides.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let spool = dir.join("spool");
        let socket = c.plugin_socket();
        c.clear_plugin_queue()?;
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let config = dir.join("ergond.toml");
        std::fs::write(
            &config,
            format!(
                "nvml_library = {}\npowercap_root = {}\nperf_sysfs_root = {}\nprefer_perf = false\n\
                 cgroup_root = \"/sys/fs/cgroup\"\nproc_root = \"/proc\"\nsocket_path = {}\n\
                 state_dir = {}\nspool_dir = {}\nmetrics_listen = \"127.0.0.1:{port}\"\n\
                 node_name = {:?}\ngres_conf = {}\nscontrol = {}\n{extra}",
                q(&lib),
                q(&powercap),
                q(&dir.join("no-perf")),
                q(&socket),
                q(&dir.join("state")),
                q(&spool),
                c.node,
                q(&c.dir.join("etc/gres.conf")),
                q(&c.program("scontrol")),
            ),
        )?;
        let log = dir.join("ergond.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(target_dir().join("debug/ergond"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            // `auto` runs scontrol, which finds this cluster through SLURM_CONF.
            .env("SLURM_CONF", &c.slurm_conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting ergond")?;
        let mut e = Ergond {
            child,
            socket,
            spool,
            log,
        };
        wait_for(Duration::from_secs(30), "ergond to serve", || {
            if let Some(status) = e.child.try_wait()? {
                bail!("ergond exited ({status}): {}", e.log_text());
            }
            let pong = (|| -> Result<Reply> {
                let mut s = std::os::unix::net::UnixStream::connect(&e.socket)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                write_frame(&mut s, &Request::Ping)?;
                Ok(read_frame(&mut s)?)
            })();
            Ok(matches!(pong, Ok(Reply::Pong)).then_some(()))
        })?;
        Ok(e)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The manifest of `job`, once in the (flat) spool, read as root.
    fn wait_manifest(&self, job: u32, node: &str) -> Result<(PathBuf, Manifest)> {
        let suffix = format!("-{job}-{node}.json");
        let path = wait_for(Duration::from_secs(30), "the job's manifest", || {
            // Not private, ergond creates the spool with its first manifest.
            let Ok(entries) = std::fs::read_dir(&self.spool) else {
                return Ok(None);
            };
            Ok(entries.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.') && n.ends_with(&suffix))
            }))
        })?;
        let m = Manifest::from_json(&std::fs::read(&path)?)?;
        Ok((path, m))
    }
}

impl Drop for Ergond {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .map(|m| m.mode() & 0o777)
        .unwrap_or(0)
}

struct Setup {
    c: &'static Cluster,
    dir: ergon_tests::TempDir,
    ergond: Ergond,
    _guard: std::sync::MutexGuard<'static, ()>,
}

fn setup(name: &str, extra: &str) -> Setup {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    c.install_plugin(ergon_tests::PLUGIN_ARGS).unwrap();
    let dir = scratch_dir(name).unwrap();
    let ergond = Ergond::start(c, dir.path(), extra).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(dir.path().join("ergond.log")).unwrap_or_default();
        panic!("ergond did not start: {e:#}\n--- ergond log ---\n{log}")
    });
    Setup {
        c,
        dir,
        ergond,
        _guard: guard,
    }
}

impl Setup {
    fn run(&mut self, body: impl FnOnce(&mut Setup) -> Result<()>) {
        if let Err(e) = body(self) {
            panic!("{e:#}\n--- ergond log ---\n{}", self.ergond.log_text());
        }
    }

    /// A short `--gres=gpu:1 --energy-report` job of `user`, run in a directory of theirs; its
    /// id and that directory, once the job completed.
    fn job_of(&self, user: &str) -> Result<(u32, PathBuf)> {
        let home = self.dir.path().join(format!("home-{user}"));
        std::fs::create_dir_all(&home)?;
        let (uid, gid) = ids_of(user)?;
        std::os::unix::fs::chown(&home, Some(uid), Some(gid))?;
        let out = self.c.run(
            "runuser",
            [
                "-u",
                user,
                "--",
                "sbatch",
                "--parsable",
                &format!("--chdir={}", home.display()),
                "--time=5",
                "--gres=gpu:1",
                "--energy-report",
                "--output=/dev/null",
                "--wrap",
                "sleep 1",
            ],
        )?;
        let job: u32 = String::from_utf8(out.stdout)?
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .parse()?;
        self.c.wait_completed(job)?;
        Ok((job, home))
    }

    /// `accounting.toml` for this test (world-readable, so users read it too).
    fn accounting(&self, extra: &str) -> Result<PathBuf> {
        let config = self.dir.path().join("accounting.toml");
        std::fs::write(
            &config,
            format!(
                "spool_dirs = [{:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\
                 scontrol = {:?}\n{extra}\n[sacct]\nfield = \"AdminComment\"\n",
                self.ergond.spool.display().to_string(),
                self.dir
                    .path()
                    .join("acct/quarantine")
                    .display()
                    .to_string(),
                self.dir.path().join("acct/state").display().to_string(),
                self.c.program("scontrol").display().to_string(),
            ),
        )?;
        Ok(config)
    }

    /// `ergon ARGS` as `user` (`None`: root).
    fn ergon(&self, user: Option<&str>, config: &Path, args: &[&str]) -> Result<Output> {
        let bin = target_dir().join("debug/ergon");
        ensure!(bin.exists(), "{} is missing", bin.display());
        let mut cmd = match user {
            None => self.c.cmd(&bin),
            Some(u) => {
                let mut c = self.c.cmd("runuser");
                c.args(["-u", u, "--"]).arg(&bin);
                c
            }
        };
        Ok(cmd.arg("--config").arg(config).args(args).output()?)
    }

    /// `ergon run` as root, until the job's record is in sacct.
    fn collect(&self, config: &Path, job: u32) -> Result<()> {
        let out = self.ergon(None, config, &["run"])?;
        ensure!(out.status.success(), "ergon run: {}", show(&out));
        let v = self.c.sacct_field(job, "AdminComment")?;
        ensure!(
            v.as_deref().is_some_and(|v| v.contains("ergon1")),
            "no ergon1 record in AdminComment after ergon run: {v:?}\n{}",
            show(&out)
        );
        Ok(())
    }
}

fn ids_of(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, user]).output()?;
        ensure!(out.status.success(), "id {flag} {user} failed");
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// Whether `user` can read `path` (`cat` as them).
fn readable_by(c: &Cluster, user: &str, path: &Path) -> Result<bool> {
    let out = c
        .cmd("runuser")
        .args(["-u", user, "--", "cat"])
        .arg(path)
        .output()?;
    Ok(out.status.success())
}

#[test]
fn auto_follows_slurms_private_data() {
    let t0 = Instant::now();
    let mut s = setup("privacy-auto", "");
    s.run(|s| {
        let c = s.c;
        let private = slurm_private(c)?;
        let user = c.test_user.clone();
        let (job, home) = s.job_of(&user)?;
        let (manifest, _) = s.ergond.wait_manifest(job, &c.node)?;
        let report = home.join(format!("ergon-{job}.txt"));
        wait_for_file(&report, Duration::from_secs(15))?;
        let log = s.ergond.log_text();
        let config = s.accounting("")?;
        s.collect(&config, job)?;
        let state = s.dir.path().join("acct/state");
        let records = state.join("records.sqlite");
        if private {
            ensure!(
                log.contains("job data is private") && log.contains("PrivateData"),
                "ergond did not say why job data is private:\n{log}"
            );
            ensure!(
                mode(&s.ergond.spool) == 0o700,
                "spool {:o}",
                mode(&s.ergond.spool)
            );
            ensure!(mode(&manifest) == 0o600, "manifest {:o}", mode(&manifest));
            ensure!(mode(&report) == 0o600, "report {:o}", mode(&report));
            ensure!(mode(&state) == 0o700, "state {:o}", mode(&state));
            ensure!(mode(&records) == 0o600, "records {:o}", mode(&records));
            ensure!(!readable_by(c, &second_user(), &manifest)?);
        } else {
            ensure!(
                log.contains("job data is not private"),
                "ergond did not say job data is open:\n{log}"
            );
            ensure!(mode(&manifest) == 0o644, "manifest {:o}", mode(&manifest));
            ensure!(mode(&report) == 0o644, "report {:o}", mode(&report));
            ensure!(readable_by(c, &second_user(), &manifest)?);
        }
        ensure!(readable_by(c, &user, &report)?);
        println!("private={private}, {:?}", t0.elapsed());
        Ok(())
    });
}

#[test]
fn a_user_sees_their_own_jobs_energy_and_no_one_elses() {
    let mut s = setup("privacy-users", "");
    s.run(|s| {
        let c = s.c;
        if !slurm_private(c)? {
            println!(
                "SKIPPED a_user_sees_their_own_jobs_energy_and_no_one_elses: the cluster has no \
                 PrivateData (scripts/test runs it on one that has)"
            );
            return Ok(());
        }
        let a = c.test_user.clone();
        let b = &second_user();
        let (job, _) = s.job_of(&a)?;
        let (manifest, m) = s.ergond.wait_manifest(job, &c.node)?;
        let config = s.accounting("")?;
        s.collect(&config, job)?;
        let energy = format!("{}", m.totals.energy_j.round() as u64);
        let jobs = job.to_string();

        // B: not the manifest, not the energy, no file names, no stack trace.
        ensure!(
            !readable_by(c, b, &manifest)?,
            "{b} reads {}",
            manifest.display()
        );
        let out = s.ergon(Some(b), &config, &["report", &jobs])?;
        let text = show(&out);
        println!("ergon report as {b}:\n{text}");
        ensure!(out.status.code() == Some(1), "ergon report as {b}: {text}");
        ensure!(
            !text.contains("ergon1")
                && !text.contains(" J")
                && !text.contains(&manifest.display().to_string())
                && !text.contains("panicked"),
            "ergon report as {b} shows {a}'s job: {text}"
        );
        ensure!(text.contains("sacct does not list job"), "{text}");
        ensure!(text.contains("not available"), "{text}");
        let out = s.ergon(Some(b), &config, &["report", &jobs, "--json"])?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| show(&out))?;
        ensure!(
            v["sacct_record"].is_null() && v["manifests"].is_null(),
            "{}",
            show(&out)
        );
        for cmd in ["jobs", "summary"] {
            let out = s.ergon(Some(b), &config, &[cmd])?;
            let text = show(&out);
            ensure!(out.status.code() == Some(1), "ergon {cmd} as {b}: {text}");
            ensure!(
                text.contains("readable by root and the ergon group only")
                    && out.stdout.is_empty()
                    && !text.contains("panicked"),
                "ergon {cmd} as {b}: {text}"
            );
        }

        let svg = std::env::temp_dir().join(format!("ergon-privacy-{job}.svg"));
        let out = s.ergon(
            Some(b),
            &config,
            &["plot", &jobs, "-o", &svg.display().to_string()],
        )?;
        let text = show(&out);
        ensure!(
            out.status.code() == Some(1)
                && text.contains("private job data")
                && !svg.exists()
                && !text.contains("panicked"),
            "ergon plot as {b}: {text}"
        );

        // A: their own job's energy, from sacct, and why there is no more.
        let out = s.ergon(Some(&a), &config, &["report", &jobs])?;
        let text = show(&out);
        println!("ergon report as {a}:\n{text}");
        ensure!(out.status.success(), "ergon report as {a}: {text}");
        ensure!(
            text.contains(&format!("({energy} J)")),
            "{a} does not get the job's {energy} J: {text}"
        );
        ensure!(text.contains("source    sacct (AdminComment)"), "{text}");
        ensure!(text.contains("detail    not available"), "{text}");
        ensure!(!text.contains("warning"), "{text}");

        // Root: the whole record, from the job-records database.
        let out = s.ergon(None, &config, &["report", &jobs, "--json"])?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| show(&out))?;
        ensure!(
            v["source"] == "records" && v["restricted"].is_null(),
            "{}",
            show(&out)
        );
        ensure!(
            (v["manifests"]["energy_j"].as_f64().unwrap_or(-1.0) - m.totals.energy_j).abs()
                < 1e-6 * m.totals.energy_j.max(1.0),
            "{}",
            show(&out)
        );
        Ok(())
    });
}

#[test]
fn private_data_no_keeps_job_data_open() {
    let mut s = setup("privacy-no", "private_data = \"no\"\n");
    s.run(|s| {
        let c = s.c;
        let a = c.test_user.clone();
        let (job, home) = s.job_of(&a)?;
        let (manifest, m) = s.ergond.wait_manifest(job, &c.node)?;
        ensure!(mode(&manifest) == 0o644, "manifest {:o}", mode(&manifest));
        let report = home.join(format!("ergon-{job}.txt"));
        wait_for_file(&report, Duration::from_secs(15))?;
        ensure!(mode(&report) == 0o644, "report {:o}", mode(&report));
        ensure!(s.ergond.log_text().contains("private_data = \"no\""));
        ensure!(readable_by(c, &second_user(), &manifest)?);
        // B reads A's energy from the open spool (no `ergon run` yet: manifests only).
        let config = s.accounting("private_data = \"no\"")?;
        let out = s.ergon(
            Some(&second_user()),
            &config,
            &["report", &job.to_string(), "--json"],
        )?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| show(&out))?;
        ensure!(
            v["source"] == "spool"
                && (v["manifests"]["energy_j"].as_f64().unwrap_or(-1.0) - m.totals.energy_j).abs()
                    < 1e-6 * m.totals.energy_j.max(1.0),
            "{}",
            show(&out)
        );
        Ok(())
    });
}
