//! Every script in `scripts/` (and `scripts/lib.sh`, which they source) passes `shellcheck -x`,
//! run from the repository root so that `# shellcheck source=scripts/lib.sh` resolves. Without
//! shellcheck installed the test says so (`SKIPPED …`) instead of passing silently. The scripts
//! are the same whatever the Slurm release, so it runs in scripts/test's 22.05 round only.

use std::process::Command;

use ergon_tests::repo_root;

#[test]
fn scripts_pass_shellcheck() {
    let release = std::env::var("ERGON_CLUSTER_SLURM").unwrap_or_else(|_| "22.05".into());
    if release != "22.05" {
        ergon_testkit::skipped(
            "scripts_pass_shellcheck",
            &format!("runs in the 22.05 round only (this round: Slurm {release})"),
        );
        return;
    }
    if Command::new("shellcheck")
        .arg("--version")
        .output()
        .is_err()
    {
        ergon_testkit::skipped(
            "scripts_pass_shellcheck",
            "shellcheck is not installed (apt-get install shellcheck)",
        );
        return;
    }
    let root = repo_root();
    let mut scripts: Vec<String> = std::fs::read_dir(root.join("scripts"))
        .expect("read scripts/")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| format!("scripts/{}", e.file_name().to_string_lossy()))
        .collect();
    scripts.sort();
    assert!(
        scripts.iter().any(|s| s == "scripts/lib.sh") && scripts.len() > 3,
        "{scripts:?}"
    );
    let out = Command::new("shellcheck")
        .arg("-x")
        .args(&scripts)
        .current_dir(&root)
        .output()
        .expect("run shellcheck");
    assert!(
        out.status.success(),
        "shellcheck -x {}:\n{}{}",
        scripts.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
