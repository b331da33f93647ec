//! What changed across Slurm releases, each checked on the release where it applies:
//!
//! - `a_failing_spank_function_fails_the_job_but_ergon_never_does`: a plugin that only fails
//!   (`tests/fixtures/spank_fail.c`, built here against the release's own headers) returns -1,
//!   then 1, from `slurm_spank_task_post_fork`, the hook where ergon sends `StepStart`. On every
//!   release -1 fails the job's launch and its script never runs: 22.05 drains the node (and
//!   records the job COMPLETED, exit code 0), 24.11 and 26.05 requeue the job and drain the node
//!   when the batch step (not the extern step) met the failure first; 1 is ignored before 25.05 and
//!   fails the launch the same way from 25.05 on, where any non-zero return is an error. With
//!   ergon's plugin and no ergond at all, the same job completes, is never requeued, and the
//!   node stays up, on every release.
//! - `env_uuid_puts_uuids_in_cuda_visible_devices_but_slurm_job_gpus_stays_indices` (26.05+):
//!   gres.conf `Flags=env_uuid` with `AutoDetect=nvidia` on four fake NVIDIA GPUs (device nodes
//!   in the root's own /dev, the driver's /proc/driver/nvidia/gpus/*/information files bound
//!   over the root's /proc/driver): the job sees UUIDs in `CUDA_VISIBLE_DEVICES`, and the
//!   plugin's `JobStart` still names Slurm's GPU indices. gres.conf, the mounts and slurmd are
//!   put back at the end, also on failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use ergon_protocol::Request;
use ergon_tests::{
    cluster, repo_root, scratch_dir, wait_for_file, Cluster, Listener, ListenerMode, JOB_TIMEOUT,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn restart_slurmd() {
    let out = Command::new(repo_root().join("scripts/slurm-cluster"))
        .arg("restart-slurmd")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restart-slurmd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A plugstack drop-in removed when dropped.
struct DropIn(PathBuf);

impl Drop for DropIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The node's state word (`idle`, `drain`, `drained`, …).
fn node_state(c: &Cluster) -> String {
    let out = c
        .run("sinfo", ["-h", "-N", "-n", &c.node, "-o", "%T"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Brings a drained node back (what a failing SPANK plugin may cause) and waits until it is idle.
fn resume(c: &Cluster) {
    let _ = c.run(
        "scontrol",
        ["update", &format!("nodename={}", c.node), "state=resume"],
    );
    ergon_tests::wait_for(Duration::from_secs(60), "the node to be idle", || {
        Ok(matches!(node_state(c).as_str(), "idle" | "mixed" | "allocated").then_some(()))
    })
    .unwrap();
}

/// What a job did and what became of the node.
#[derive(Debug)]
struct Outcome {
    /// The job's script ran: its step left the file it writes.
    ran: bool,
    /// The job's last state word in sacct when it was seen to end or go back to the queue.
    state: String,
    /// Slurm put the job back in the queue (`Restarts` > 0 in `scontrol show job`).
    requeued: bool,
    node_drained: bool,
}

impl Outcome {
    /// The job ran to completion and nothing else happened to it or to the node.
    fn completed_cleanly(&self) -> bool {
        self.ran && self.state == "COMPLETED" && !self.requeued && !self.node_drained
    }

    /// The job's script never ran, and Slurm said so: it requeued the job or drained the node
    /// (22.05 records such a job as COMPLETED with exit code 0: its state alone says nothing).
    fn launch_failed(&self) -> bool {
        !self.ran && (self.requeued || self.node_drained)
    }
}

/// How often slurmctld has requeued a job it still knows (`Restarts=` of `scontrol show job`).
fn restarts(c: &Cluster, job: u32) -> u32 {
    c.scontrol_job(job)
        .ok()
        .and_then(|kv| {
            kv.into_iter()
                .find(|(k, _)| k == "Restarts")?
                .1
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Runs a batch job whose one step writes `mark` and says how it ended. A job that goes back to
/// the queue is cancelled, and a drained node is resumed, so that the next job finds the node
/// idle.
fn run_job(c: &Cluster, mark: &Path, extra: &[&str]) -> Outcome {
    let _ = std::fs::remove_file(mark);
    let wrap = format!("srun touch {}", mark.display());
    let mut args = vec!["--output=/dev/null", "--time=2"];
    args.extend_from_slice(extra);
    args.extend(["--wrap", &wrap]);
    let job = c.sbatch(&args).unwrap();
    // A job whose launch fails may go back to the queue and never end by itself (24.11, 26.05;
    // 22.05 ends it). Which of its first two steps meets a failing plugin first is a race: when the batch step's launch fails,
    // slurmd reports that and the node drains; when the extern step fails first, slurmctld kills
    // the job before its batch step starts, and requeues it without draining the node (both seen
    // on 26.05).
    let (state, requeued) = ergon_tests::wait_for(
        JOB_TIMEOUT,
        &format!("job {job} to end, go back to the queue or drain its node"),
        || {
            let state = c.sacct_field(job, "State")?.unwrap_or_default();
            let word = state
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            if ["COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT"].contains(&word.as_str())
            {
                return Ok(Some((word, false)));
            }
            let requeued = word == "REQUEUED" || restarts(c, job) > 0;
            if requeued || node_state(c).starts_with("drain") {
                return Ok(Some((word, requeued)));
            }
            Ok(None)
        },
    )
    .unwrap();
    if state != "COMPLETED" || requeued {
        let _ = c.run("scancel", [job.to_string()]);
        // The drain, when there is one, comes with the failed launch; once the cancelled job has
        // left the queue, the node's state is final.
        ergon_tests::wait_for(
            Duration::from_secs(60),
            &format!("cancelled job {job} to leave the queue"),
            || {
                let out = c.run("squeue", ["-h", "-j", &job.to_string(), "-o", "%T"]);
                Ok(match out {
                    Ok(o) => String::from_utf8_lossy(&o.stdout).trim().is_empty(),
                    Err(_) => true,
                }
                .then_some(()))
            },
        )
        .unwrap();
    }
    let drained = node_state(c).starts_with("drain");
    if drained {
        resume(c);
    }
    Outcome {
        ran: mark.exists(),
        state,
        requeued,
        node_drained: drained,
    }
}

#[test]
fn a_failing_spank_function_fails_the_job_but_ergon_never_does() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    c.install_plugin(ergon_tests::PLUGIN_ARGS).unwrap();
    let dir = scratch_dir("releases-fail").unwrap();
    // The failing plugin, for this release (slurmstepd loads only a plugin of its own release).
    let so = dir.path().join("spank_fail.so");
    let include = c.root_path("/usr/include");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(format!("-I{}", include.display()))
        .arg(repo_root().join("tests/fixtures/spank_fail.c"))
        .output()
        .expect("cc (build-essential) is needed to build the test plugin");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ergon's plugin talks to nobody: no ergond.
    let _ = std::fs::remove_file(c.plugin_socket());
    let dropin = c.dir.join("etc/plugstack.conf.d/zz-fail.conf");
    let guard = DropIn(dropin.clone());
    let mut seen = Vec::new();
    for rc in [-1, 1] {
        std::fs::write(&dropin, format!("required {} rc={rc}\n", so.display())).unwrap();
        let outcome = run_job(c, &dir.path().join(format!("ran-{rc}")), &[]);
        println!(
            "Slurm {}: a SPANK task_post_fork returning {rc}: {outcome:?}",
            c.release
        );
        seen.push((rc, outcome));
    }
    drop(guard);
    // ergon's own plugin, its daemon absent, on the same release: the job completes and the node
    // stays up.
    let ergon = run_job(c, &dir.path().join("ran-ergon"), &["--energy-report"]);
    println!("Slurm {}: ergon with no ergond: {ergon:?}", c.release);
    assert!(
        ergon.completed_cleanly(),
        "ergon broke a job on Slurm {}: {ergon:?}",
        c.release
    );
    println!("Slurm {}: failing plugin {seen:?}", c.release);
    // What each release does with a failing task_post_fork (observed on 22.05, 24.11 and 26.05):
    // -1 fails the launch on all three, and the script never runs. 22.05 drains the node and
    // records the job as COMPLETED, exit code 0; 24.11 and 26.05 requeue the job, and drain the
    // node when the batch step was the one to meet the failure. 1 is ignored before 25.05 and
    // fails the launch the same way from 25.05 on ("any non-zero return is an error").
    let (minus_one, one) = (&seen[0].1, &seen[1].1);
    assert!(
        minus_one.launch_failed(),
        "Slurm {}: a SPANK function returning -1 did not fail the launch: {minus_one:?}",
        c.release
    );
    if c.version() >= (25, 5) {
        assert!(
            one.launch_failed(),
            "Slurm {}: returning 1 is an error from 25.05 on: {one:?}",
            c.release
        );
    } else {
        assert!(
            one.completed_cleanly(),
            "Slurm {}: returning 1 was ignored before 25.05: {one:?}",
            c.release
        );
    }
}

/// Puts gres.conf back, unmounts the fake driver files, removes the fake device nodes and
/// restarts slurmd when dropped.
struct RestoreGpus {
    gres_conf: PathBuf,
    original: String,
    driver_mount: Option<PathBuf>,
    devices: Vec<PathBuf>,
}

impl Drop for RestoreGpus {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.gres_conf, &self.original);
        if let Some(m) = &self.driver_mount {
            let _ = Command::new("umount").arg(m).status();
        }
        for d in &self.devices {
            let _ = std::fs::remove_file(d);
        }
        restart_slurmd();
    }
}

fn fake_uuid(i: usize) -> String {
    format!("GPU-00000000-0000-4000-8000-0000000000{i:02x}")
}

#[test]
fn env_uuid_puts_uuids_in_cuda_visible_devices_but_slurm_job_gpus_stays_indices() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    if c.version() < (26, 5) {
        println!(
            "SKIPPED on Slurm {}: gres.conf Flags=env_uuid exists from 26.05 on",
            c.release
        );
        return;
    }
    let root = c.root.clone().expect("26.05 runs in a Debian root");
    c.install_plugin(ergon_tests::PLUGIN_ARGS).unwrap();
    let dir = scratch_dir("releases-uuid").unwrap();
    let gres_conf = c.dir.join("etc/gres.conf");
    let mut restore = RestoreGpus {
        original: std::fs::read_to_string(&gres_conf).unwrap(),
        gres_conf: gres_conf.clone(),
        driver_mount: None,
        devices: Vec::new(),
    };
    // Four GPUs as the NVIDIA driver shows them: /proc/driver/nvidia/gpus/<bus>/information,
    // and /dev/nvidia<minor> (in the root's own /dev, never the host's).
    let minors = [6u32, 7, 4, 5];
    let driver = dir.path().join("driver");
    for (i, minor) in minors.iter().enumerate() {
        let bus = format!("0000:{:02x}:00.0", i + 1);
        let info = driver.join("nvidia/gpus").join(&bus);
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(
            info.join("information"),
            format!(
                "Model: \t\t Fake GPU\nIRQ:   \t\t 100\nGPU UUID: \t {}\nVideo BIOS: \t ??.??.??.??.??\n\
                 Bus Type: \t PCIe\nDMA Size: \t 47 bits\nDMA Mask: \t 0x7fffffffffff\n\
                 Bus Location: \t {bus}\nDevice Minor: \t {minor}\nGPU Excluded:\t No\n",
                fake_uuid(i)
            ),
        )
        .unwrap();
        let dev = root.join(format!("dev/nvidia{minor}"));
        let _ = std::fs::remove_file(&dev);
        let ok = Command::new("mknod")
            .arg(&dev)
            .args(["c", "195", &minor.to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "mknod {}", dev.display());
        restore.devices.push(dev);
    }
    let proc_driver = root.join("proc/driver");
    let ok = Command::new("mount")
        .arg("--bind")
        .arg(&driver)
        .arg(&proc_driver)
        .status()
        .unwrap();
    assert!(ok.success(), "mount --bind over {}", proc_driver.display());
    restore.driver_mount = Some(proc_driver);
    std::fs::write(&gres_conf, "AutoDetect=nvidia\nName=gpu Flags=env_uuid\n").unwrap();
    restart_slurmd();

    let listener = Listener::start(
        Path::new(env!("CARGO_BIN_EXE_ergon-test-listener")),
        &c.plugin_socket(),
        &dir.path().join("events.jsonl"),
        ListenerMode::Ok,
    )
    .unwrap();
    let out = dir.path().join("job.out");
    let job = c
        .sbatch([
            "--gres=gpu:2",
            &format!("--output={}", out.display()),
            "--wrap",
            "echo SLURM_JOB_GPUS=$SLURM_JOB_GPUS; echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES",
        ])
        .unwrap();
    c.wait_completed(job).unwrap();
    let text = wait_for_file(&out, Duration::from_secs(30)).unwrap();
    println!("job {job} (Slurm {}):\n{text}", c.release);
    let value = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_default()
            .to_string()
    };
    let cvd: Vec<String> = value("CUDA_VISIBLE_DEVICES")
        .split(',')
        .map(str::to_string)
        .collect();
    let uuids: Vec<String> = (0..4).map(fake_uuid).collect();
    assert_eq!(cvd.len(), 2, "CUDA_VISIBLE_DEVICES: {cvd:?}");
    assert!(
        cvd.iter().all(|u| uuids.contains(u)),
        "env_uuid did not put the GPUs' UUIDs in CUDA_VISIBLE_DEVICES: {cvd:?}"
    );
    let indices: Vec<u32> = value("SLURM_JOB_GPUS")
        .split(',')
        .map(|i| {
            i.parse()
                .unwrap_or_else(|_| panic!("SLURM_JOB_GPUS is not indices: {text}"))
        })
        .collect();
    assert_eq!(indices.len(), 2, "{text}");
    // The plugin's JobStart names the same indices.
    let ev = listener
        .wait_events("the job's start and end", Duration::from_secs(60), |ev| {
            ev.iter()
                .any(|e| matches!(&e.request, Request::JobEnd(x) if x.job_id == job))
        })
        .unwrap();
    let start = ev
        .iter()
        .find_map(|e| match &e.request {
            Request::JobStart(s) if s.ids.job_id == job => Some(s.clone()),
            _ => None,
        })
        .expect("a JobStart");
    let sent: Vec<u32> = start.gpus.iter().map(|g| g.index).collect();
    assert_eq!(sent, indices, "JobStart GPUs {:?}", start.gpus);
    drop(listener);
    drop(restore);
}
