//! `scripts/lib.sh`, the shell functions the scripts share, run by bash (no root, no cluster):
//! a daemon started with `start_detached` holds none of the caller's descriptors, is found by
//! its pid file (by program name or path, never another program's), stopped by `stop_pidfile`
//! (status 1 the second time); `wait_until` times out and succeeds; `die` and
//! `check_plain_path` say what failed with the script's name.

use std::process::Command;

const SCRIPT: &str = r#"
set -euo pipefail
LIB_NAME=libtest
source "$REPO/scripts/lib.sh"
d=$SCRATCH
exec 7>"$d/held"
start_detached "$d/s.pid" "$d/s.log" sleep 300
pid=$(pid_of "$d/s.pid")
pidfile_alive "$d/s.pid" sleep && echo "alive-by-name"
pidfile_alive "$d/s.pid" "$(readlink -f "$(command -v sleep)")" && echo "alive-by-path"
pidfile_alive "$d/s.pid" ergond || echo "not-another-program"
if ls -l "/proc/$pid/fd" | grep -q "$d/held"; then echo "fd-leaked"; else echo "fd-not-inherited"; fi
wait_until 1 false || echo "wait-timed-out"
wait_until 5 test -s "$d/s.pid" && echo "wait-succeeded"
stop_pidfile "$d/s.pid" sleep "the sleeper" && echo "stopped"
pid_gone "$pid" && echo "gone"
[[ -e $d/s.pid ]] || echo "pidfile-removed"
stop_pidfile "$d/s.pid" sleep "the sleeper" || echo "not-running"
check_plain_path SOME_DIR "/a b"
echo "not reached"
"#;

#[test]
fn lib_sh_starts_finds_and_stops_by_pid_file() {
    let scratch = std::env::temp_dir()
        .join("ergon-tests")
        .join(format!("lib-sh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let out = Command::new("bash")
        .args(["-c", SCRIPT])
        .env("REPO", ergon_tests::repo_root())
        .env("SCRATCH", &scratch)
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "alive-by-name",
            "alive-by-path",
            "not-another-program",
            "fd-not-inherited",
            "wait-timed-out",
            "wait-succeeded",
            "stopped",
            "gone",
            "pidfile-removed",
            "not-running",
        ],
        "stderr:\n{stderr}"
    );
    // check_plain_path refused the path through die: the script's name, exit 1.
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("libtest: error: SOME_DIR must be an absolute path"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
