//! Smoke tests of the development cluster itself: if these fail, every other end-to-end test
//! would fail for reasons that have nothing to do with ergon.

use std::time::Duration;

use ergon_tests::{cluster, scratch_dir, wait_for, wait_for_file, JOB_TIMEOUT};

#[test]
fn batch_job_completes_and_is_accounted_in_sacct() {
    let c = cluster();
    let dir = scratch_dir("batch").unwrap();
    let out = dir.path().join("out.txt");
    let job = c
        .sbatch([
            "--job-name=ergon-smoke",
            &format!("--output={}", out.display()),
            "--wrap",
            "echo hello from $SLURM_JOB_ID",
        ])
        .unwrap();
    c.wait_completed(job).unwrap();

    assert_eq!(
        std::fs::read_to_string(&out).unwrap().trim(),
        format!("hello from {job}")
    );
    // slurmdbd fills a short job's record in from several messages (a job that ends before its
    // start record is stored is first named "allocation"), so wait until the record is whole.
    let rows = wait_for(
        Duration::from_secs(60),
        "sacct to hold the whole job record",
        || {
            let rows = c.sacct_rows(job, "JobID,JobName,State,ExitCode").unwrap();
            let whole = rows
                .iter()
                .any(|r| r[0] == job.to_string() && r[1] == "ergon-smoke")
                && rows.iter().any(|r| r[0] == format!("{job}.batch"));
            Ok(whole.then_some(rows))
        },
    )
    .unwrap();
    let alloc = rows.iter().find(|r| r[0] == job.to_string()).unwrap();
    assert_eq!(alloc[1], "ergon-smoke");
    assert_eq!(alloc[2], "COMPLETED");
    assert_eq!(alloc[3], "0:0");
    // The batch step and (PrologFlags=Contain) the extern step are accounted too.
    for step in ["batch", "extern"] {
        assert!(
            rows.iter().any(|r| r[0] == format!("{job}.{step}")),
            "no {job}.{step} in sacct: {rows:?}"
        );
    }
    assert_eq!(c.sacct_field(job, "Cluster").unwrap().unwrap(), "ergon-dev");
}

#[test]
fn gres_gpu_allocation_is_visible_to_the_job() {
    let c = cluster();
    let dir = scratch_dir("gres").unwrap();
    let out = dir.path().join("out.txt");
    let job = c
        .sbatch([
            "--gres=gpu:2",
            &format!("--output={}", out.display()),
            "--wrap",
            "echo SLURM_JOB_GPUS=$SLURM_JOB_GPUS; echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES",
        ])
        .unwrap();
    c.wait_completed(job).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("SLURM_JOB_GPUS=0,1"), "job printed: {text}");
    assert!(
        text.contains("CUDA_VISIBLE_DEVICES=0,1"),
        "job printed: {text}"
    );
    let tres = c.sacct_field(job, "AllocTRES").unwrap().unwrap();
    assert!(tres.contains("gres/gpu=2"), "AllocTRES = {tres}");
}

#[test]
fn task_cgroup_exists_under_cpuacct_while_the_job_runs() {
    let c = cluster();
    let dir = scratch_dir("cgroup").unwrap();
    let cgroup_file = dir.path().join("cgroup.txt");
    let release = dir.path().join("release");
    // The job reports its own cgroups, then holds until the test releases it: the test checks
    // the hierarchy while the task certainly runs, with no timing guess.
    let script = format!(
        "cat /proc/self/cgroup > {cg}.tmp && mv {cg}.tmp {cg}; \
         while [ ! -e {rel} ]; do sleep 0.1; done",
        cg = cgroup_file.display(),
        rel = release.display()
    );
    let job = c
        .sbatch(["--output=/dev/null", "--time=5", "--wrap", &script])
        .unwrap();
    let text = wait_for_file(&cgroup_file, JOB_TIMEOUT).unwrap();
    let cpuacct = text
        .lines()
        .filter_map(|l| l.splitn(3, ':').collect::<Vec<_>>().try_into().ok())
        .find_map(|[_, ctrl, path]: [&str; 3]| {
            ctrl.split(',')
                .any(|c| c == "cpuacct")
                .then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("no cpuacct line in {text}"));
    assert!(
        cpuacct.contains(&format!("/job_{job}/")),
        "task cgroup {cpuacct} does not name job {job}"
    );
    let dir_on_disk =
        std::path::Path::new("/sys/fs/cgroup/cpuacct").join(cpuacct.trim_start_matches('/'));
    let usage: u64 = std::fs::read_to_string(dir_on_disk.join("cpuacct.usage"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(usage > 0, "a running task has used some CPU time");

    std::fs::write(&release, b"").unwrap();
    c.wait_completed(job).unwrap();
    // Slurm removes the job's cgroups when it ends.
    wait_for(
        Duration::from_secs(30),
        "the task cgroup to be removed",
        || Ok((!dir_on_disk.exists()).then_some(())),
    )
    .unwrap();
}

#[test]
fn up_again_leaves_the_same_healthy_cluster() {
    let c = cluster();
    let pids = |c: &ergon_tests::Cluster| -> Vec<String> {
        [
            "munge/run/munged.pid",
            "mysql-run/mariadb.pid",
            "run/slurmdbd.pid",
            "run/slurmctld.pid",
            "run/slurmd.pid",
        ]
        .iter()
        .map(|p| {
            std::fs::read_to_string(c.dir.join(p))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect()
    };
    let before = pids(c);
    let script = ergon_tests::repo_root().join("scripts/slurm-cluster");
    let up = std::process::Command::new(&script)
        .arg("up")
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert_eq!(pids(c), before, "a second `up` restarted daemons");
    let status = std::process::Command::new(&script)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "status after a second up: {text}");
    assert_eq!(text.matches("running (pid").count(), 5, "{text}");
    for pid in before {
        assert!(
            std::path::Path::new("/proc").join(&pid).exists(),
            "daemon {pid} is gone"
        );
    }
}
