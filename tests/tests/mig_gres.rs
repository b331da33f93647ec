//! MIG instances through a real slurmd: a gres.conf `MultipleFiles=` line (a MIG instance of a
//! GPU, with its nvidia-caps device files) between whole GPUs. Slurm's `SLURM_JOB_GPUS` counts
//! positions in gres.conf order, one per `MultipleFiles=` line and one per `File=` file; the
//! plugin must send the whole GPUs' minors and, for the instance, its parent's minor and its GPU
//! and compute instance ids from the driver's mig-minors table.
//!
//! The test rewrites the cluster's gres.conf (the node keeps 4 GPUs, so slurmctld needs no
//! restart), restarts slurmd, and puts everything back when it ends, even on failure. It is the
//! only test in this binary, so no other test sees the changed node.

use std::path::{Path, PathBuf};
use std::process::Command;

use ergon_protocol::{GpuAlloc, MigAlloc, Request};
use ergon_tests::{cluster, repo_root, scratch_dir, Listener, ListenerMode, JOB_TIMEOUT};

/// Major number given to the fake nvidia-caps devices (any but NVIDIA's 195).
const CAPS_MAJOR: u32 = 236;

fn restart_slurmd() {
    let out = Command::new(repo_root().join("scripts/slurm-cluster"))
        .arg("restart-slurmd")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restart-slurmd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mknod_char(path: &Path, major: u32, minor: u32) {
    let _ = std::fs::remove_file(path);
    let out = Command::new("mknod")
        .arg(path)
        .args(["c", &major.to_string(), &minor.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "mknod {}", path.display());
}

/// Puts the cluster's gres.conf back and restarts slurmd when dropped.
struct Restore {
    gres_conf: PathBuf,
    original: String,
    caps: Vec<PathBuf>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.gres_conf, &self.original);
        for c in &self.caps {
            let _ = std::fs::remove_file(c);
        }
        restart_slurmd();
    }
}

#[test]
fn a_mig_instance_in_gres_conf_reaches_ergond_with_its_parent_and_instance_ids() {
    let c = cluster();
    let dev = c.dir.join("dev");
    let gres_conf = c.dir.join("etc/gres.conf");
    let original = std::fs::read_to_string(&gres_conf).unwrap();
    // The MIG instance GI 1 / CI 0 of the GPU behind fakegpu0 (device minor 6, see
    // scripts/slurm-cluster): its capability devices, and the driver's table naming them.
    let caps = vec![dev.join("nvidia-cap21"), dev.join("nvidia-cap22")];
    let restore = Restore {
        gres_conf: gres_conf.clone(),
        original,
        caps: caps.clone(),
    };
    mknod_char(&caps[0], CAPS_MAJOR, 21);
    mknod_char(&caps[1], CAPS_MAJOR, 22);
    let dir = scratch_dir("mig-gres").unwrap();
    let mig_minors = dir.path().join("mig-minors");
    std::fs::write(
        &mig_minors,
        "config 1\nmonitor 2\ngpu6/gi1/access 21\ngpu6/gi1/ci0/access 22\ngpu6/gi2/access 30\n",
    )
    .unwrap();
    let d = dev.display();
    std::fs::write(
        &gres_conf,
        format!(
            "AutoDetect=off\n\
             Name=gpu File={d}/fakegpu[1-2]\n\
             Name=gpu MultipleFiles={d}/fakegpu0,{d}/nvidia-cap21,{d}/nvidia-cap22\n\
             Name=gpu File={d}/fakegpu3\n"
        ),
    )
    .unwrap();
    c.install_plugin(&format!(
        "{} mig_minors={}",
        ergon_tests::PLUGIN_ARGS,
        mig_minors.display()
    ))
    .unwrap();
    restart_slurmd();

    let listener = Listener::start(
        PathBuf::from(env!("CARGO_BIN_EXE_ergon-test-listener")).as_path(),
        &c.plugin_socket(),
        &dir.path().join("events.jsonl"),
        ListenerMode::Ok,
    )
    .unwrap();
    let out = dir.path().join("job.out");
    let job = c
        .sbatch([
            "--gres=gpu:4",
            "--time=5",
            &format!("--output={}", out.display()),
            "--wrap",
            "echo SLURM_JOB_GPUS=$SLURM_JOB_GPUS",
        ])
        .unwrap();
    c.wait_completed(job).unwrap();
    let ev = listener
        .wait_events("the job's start", JOB_TIMEOUT, |ev| {
            ev.iter()
                .any(|e| matches!(&e.request, Request::JobStart(s) if s.ids.job_id == job))
        })
        .unwrap();
    let start = ev
        .iter()
        .find_map(|e| match &e.request {
            Request::JobStart(s) if s.ids.job_id == job => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    let job_out = std::fs::read_to_string(&out).unwrap_or_default();
    let whole = |index, minor| GpuAlloc {
        index,
        minor: Some(minor),
        mig: None,
    };
    // Positions in gres.conf order: fakegpu1 (minor 7), fakegpu2 (4), the MIG instance of
    // fakegpu0 (parent minor 6), fakegpu3 (5).
    assert_eq!(
        start.gpus,
        vec![
            whole(0, 7),
            whole(1, 4),
            GpuAlloc {
                index: 2,
                minor: Some(6),
                mig: Some(MigAlloc {
                    gpu_instance_id: 1,
                    compute_instance_id: Some(0),
                }),
            },
            whole(3, 5),
        ],
        "job output: {job_out}"
    );
    assert!(
        job_out.contains("SLURM_JOB_GPUS=0,1,2,3"),
        "Slurm numbers GPUs by gres.conf position: {job_out}"
    );
    drop(listener);
    drop(restore);
    // The node is back to four whole GPUs.
    assert!(!std::fs::read_to_string(&gres_conf)
        .unwrap()
        .contains("MultipleFiles"));
    c.install_plugin(ergon_tests::PLUGIN_ARGS).unwrap();
}
