//! The packages `scripts/package` builds, checked on the cluster's own Slurm release:
//!
//! - `debian_packages_install_and_slurmd_loads_the_packaged_plugin`: on 24.11 and 26.05,
//!   `dpkg -i` of `ergon_*.deb` and `ergon-spank-slurm-<release>_*.deb` into the release's Debian
//!   root (the cluster's overlay: the cached root stays clean), maintainer scripts included; on
//!   22.05, whose Slurm is the host's, the packages are unpacked (`dpkg-deb -x`) instead of
//!   installed on the host. Then: every file where the package says; the systemd units verify
//!   (`systemd-analyze verify`, pointed at the installed binaries); `ergond check` of the
//!   installed ergond runs on a generated RAPL tree and finds it; and the cluster's real slurmd,
//!   its plugstack pointing at the packaged `spank_ergon.so`, loads it: a job's events reach a
//!   listener. The test's plugin line is put back at the end, also on failure.
//! - `rpm_lists_the_files_and_scripts`: `rpm -qlp`, `rpm -qpc` and `rpm -qp --scripts` of the RPM.
//! - `build_plugin_says_what_to_install_when_headers_are_missing`: `scripts/build-plugin`'s
//!   refusals.
//!
//! Needs `scripts/package --profile debug` to have run (scripts/test does, before the
//! end-to-end tests); `$ERGON_PACKAGES_DIR` points elsewhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ergon_protocol::Request;
use ergon_tests::{cluster, scratch_dir, target_dir, Cluster, Listener, ListenerMode, JOB_TIMEOUT};

fn packages_dir() -> PathBuf {
    std::env::var_os("ERGON_PACKAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("packages"))
}

/// The one package file whose name starts with `prefix` and ends with `suffix`.
fn package(prefix: &str, suffix: &str) -> PathBuf {
    let dir = packages_dir();
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: build the packages first (scripts/package --profile debug)",
                dir.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {prefix}*{suffix} in {} (scripts/package --profile debug): {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    out
}

/// Where the root the packages went into is, as the host sees it, and how to run a program in it.
struct Installed {
    /// `/` of the installation, seen from the host.
    root: PathBuf,
    /// `chroot ROOT` for an installed root; nothing for unpacked files on the host.
    chroot: bool,
}

impl Installed {
    fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn command(&self, program: &str) -> Command {
        if self.chroot {
            let mut c = Command::new("chroot");
            c.arg(&self.root).arg(program);
            c
        } else {
            Command::new(self.host_path(program))
        }
    }
}

/// Puts the harness's plugin line back (and slurmd with it) when dropped.
struct RestorePlugin(&'static Cluster);

impl Drop for RestorePlugin {
    fn drop(&mut self) {
        if let Err(e) = self.0.install_plugin(ergon_tests::PLUGIN_ARGS) {
            eprintln!("could not restore the plugin line: {e:#}");
        }
    }
}

fn restart_slurmd() {
    run(Command::new(ergon_tests::repo_root().join("scripts/slurm-cluster")).arg("restart-slurmd"));
}

#[test]
fn debian_packages_install_and_slurmd_loads_the_packaged_plugin() {
    let c = cluster();
    let ergon_deb = package("ergon_", ".deb");
    let plugin_deb = package(&format!("ergon-spank-slurm-{}_", c.release), ".deb");
    let dir = scratch_dir("packages").unwrap();
    let plugin_path = format!("/usr/lib/ergon/slurm-{}/spank_ergon.so", c.release);

    let installed = if c.is_host_release() {
        let root = dir.path().join("unpacked");
        for deb in [&ergon_deb, &plugin_deb] {
            run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
        }
        println!(
            "Slurm {}: packages unpacked into {}",
            c.release,
            root.display()
        );
        Installed {
            root,
            chroot: false,
        }
    } else {
        // The cluster's root, an overlay of the cached one (scripts/slurm-cluster): dpkg runs
        // there as on a node of that release, maintainer scripts included.
        let root = c.root.clone().expect("a release in a Debian root has one");
        let out = run(Command::new("chroot")
            .arg(&root)
            .args(["dpkg", "-i"])
            .arg(&ergon_deb)
            .arg(&plugin_deb));
        println!(
            "Slurm {}: dpkg -i in {}:\n{}",
            c.release,
            root.display(),
            text(&out)
        );
        let out = run(Command::new("chroot").arg(&root).args([
            "dpkg-query",
            "-W",
            "-f=${Package} ${Status}\\n",
            "ergon",
            &format!("ergon-spank-slurm-{}", c.release),
        ]));
        let status = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            status.matches("install ok installed").count(),
            2,
            "dpkg-query: {status}"
        );
        Installed { root, chroot: true }
    };

    // Files.
    for (path, mode) in [
        ("/usr/sbin/ergond", 0o755),
        ("/usr/bin/ergon", 0o755),
        (plugin_path.as_str(), 0o644),
        ("/usr/lib/systemd/system/ergond.service", 0o644),
        ("/usr/lib/systemd/system/ergon-accounting.service", 0o644),
        ("/usr/lib/systemd/system/ergon-accounting.timer", 0o644),
        ("/usr/lib/tmpfiles.d/ergon.conf", 0o644),
        ("/etc/ergon/ergond.toml", 0o644),
        ("/etc/ergon/accounting.toml", 0o644),
        ("/usr/share/man/man8/ergond.8", 0o644),
        ("/usr/share/man/man1/ergon.1", 0o644),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let p = installed.host_path(path);
        let md = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(md.permissions().mode() & 0o777, mode, "{path}");
    }

    // The systemd units parse, pointed at the installed binaries.
    verify_units(&installed, dir.path());

    // `ergond check` of the installed ergond: on a generated RAPL tree, it finds the zones.
    let powercap = dir.path().join("powercap");
    ergon_testkit::PowercapTree::create(
        &powercap,
        &ergon_testkit::PowercapLayout::IntelServer { sockets: 1 }.zones(),
    );
    let config = dir.path().join("ergond.toml");
    std::fs::write(
        &config,
        format!(
            "nvml_library = \"/nonexistent/libnvidia-ml.so.1\"\npowercap_root = {:?}\n\
             perf_sysfs_root = {:?}\nprefer_perf = false\n",
            powercap.display().to_string(),
            dir.path().join("no-perf").display().to_string()
        ),
    )
    .unwrap();
    let out = installed
        .command("/usr/sbin/ergond")
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let report = text(&out);
    println!("ergond check:\n{report}");
    assert_eq!(out.status.code(), Some(0), "ergond check: {report}");
    assert!(report.contains("package-0"), "{report}");

    // slurmd of this release loads the packaged plugin: a job's events arrive.
    let _restore = RestorePlugin(c);
    let listener = Listener::start(
        Path::new(env!("CARGO_BIN_EXE_ergon-test-listener")),
        &c.plugin_socket(),
        &dir.path().join("events.jsonl"),
        ListenerMode::Ok,
    )
    .unwrap();
    // The path slurmd sees: inside its root, or the unpacked file on the host.
    let so = if installed.chroot {
        PathBuf::from(&plugin_path)
    } else {
        installed.host_path(&plugin_path)
    };
    std::fs::write(
        c.dir.join("etc/plugstack.conf.d/ergon.conf"),
        format!(
            "required {} socket={} gres_conf={} {}\n",
            so.display(),
            c.plugin_socket().display(),
            c.dir.join("etc/gres.conf").display(),
            ergon_tests::PLUGIN_ARGS
        ),
    )
    .unwrap();
    restart_slurmd();
    let job = c
        .sbatch(["--energy-report", "--output=/dev/null", "--wrap", "true"])
        .unwrap();
    c.wait_completed(job).unwrap();
    listener
        .wait_events(
            "the packaged plugin's events",
            Duration::from_secs(60).max(JOB_TIMEOUT / 2),
            |ev| {
                ev.iter()
                    .any(|e| matches!(&e.request, Request::JobStart(s) if s.ids.job_id == job))
                    && ev
                        .iter()
                        .any(|e| matches!(&e.request, Request::JobEnd(s) if s.job_id == job))
            },
        )
        .unwrap();
    println!(
        "Slurm {}: slurmd loaded {} and job {job} reported",
        c.release,
        so.display()
    );
}

/// `systemd-analyze verify` of the installed units, with their binaries' paths pointing into
/// the installation (systemd checks that they exist and are executable).
fn verify_units(installed: &Installed, scratch: &Path) {
    let copies = scratch.join("units");
    std::fs::create_dir_all(&copies).unwrap();
    let root = installed.root.display().to_string();
    let mut paths = Vec::new();
    for unit in [
        "ergond.service",
        "ergon-accounting.service",
        "ergon-accounting.timer",
    ] {
        let text = std::fs::read_to_string(
            installed.host_path(&format!("/usr/lib/systemd/system/{unit}")),
        )
        .unwrap();
        assert!(!text.contains("/usr/local"), "{unit} names /usr/local");
        let local = text
            .replace(
                "ExecStart=/usr/sbin/ergond",
                &format!("ExecStart={root}/usr/sbin/ergond"),
            )
            .replace(
                "ExecStart=/usr/bin/ergon ",
                &format!("ExecStart={root}/usr/bin/ergon "),
            );
        let path = copies.join(unit);
        std::fs::write(&path, local).unwrap();
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .expect("systemd-analyze (systemd) is needed to check the units");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
}

#[test]
fn rpm_lists_the_files_and_scripts() {
    let rpm = package("ergon-", ".rpm");
    let query = |args: &[&str]| -> String {
        let out = run(Command::new("rpm").args(args).arg(&rpm));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let files = query(&["-qlp"]);
    for f in [
        "/usr/sbin/ergond",
        "/usr/bin/ergon",
        "/usr/lib/systemd/system/ergond.service",
        "/usr/lib/systemd/system/ergon-accounting.timer",
        "/usr/lib/tmpfiles.d/ergon.conf",
        "/etc/ergon/ergond.toml",
        "/usr/share/man/man8/ergond.8",
        "/usr/share/doc/ergon/dashboards/node.json",
        "/usr/share/doc/ergon/dashboards/job.json",
        "/usr/share/doc/ergon/dashboards/site.json",
    ] {
        assert!(
            files.lines().any(|l| l == f),
            "{f} not in rpm -qlp:\n{files}"
        );
    }
    assert!(!files.contains("/usr/local"), "{files}");
    let configs = query(&["-qpc"]);
    assert_eq!(
        configs.lines().collect::<Vec<_>>(),
        ["/etc/ergon/accounting.toml", "/etc/ergon/ergond.toml"],
        "config files"
    );
    let scripts = query(&["-qp", "--scripts"]);
    for want in [
        "postinstall scriptlet",
        "systemctl daemon-reload",
        "systemd-tmpfiles --create /usr/lib/tmpfiles.d/ergon.conf",
        "preuninstall scriptlet",
        "systemctl stop ergond.service",
        "postuninstall scriptlet",
    ] {
        assert!(
            scripts.contains(want),
            "{want:?} not in the RPM's scripts:\n{scripts}"
        );
    }
    // Nothing is started by installing.
    assert!(
        !scripts.contains("systemctl start") && !scripts.contains("enable"),
        "{scripts}"
    );
}

/// `scripts/build-plugin` without Slurm's headers stops before cargo runs and says what to
/// install, for each way a site gets Slurm.
#[test]
fn build_plugin_says_what_to_install_when_headers_are_missing() {
    let dir = scratch_dir("build-plugin").unwrap();
    let out = Command::new(ergon_tests::repo_root().join("scripts/build-plugin"))
        .arg("--include")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "built without headers: {err}");
    for needle in [
        "no Slurm headers in",
        "libslurm-dev",
        "slurm-devel",
        "--include PREFIX/include",
    ] {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    let out = Command::new(ergon_tests::repo_root().join("scripts/build-plugin"))
        .args(["--slurm", "23.02"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("not one of the releases ergon is tested on"),
        "{err}"
    );
}
