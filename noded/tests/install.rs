//! Installation: `scripts/install` staged into a temporary directory (no root needed), the files
//! it ships (`packaging/`), the man pages the binaries generate, and ergond's side of the
//! systemd unit (`Type=notify`, `WatchdogSec=`) against a fake notification socket.
//!
//! The install tests take the binaries from this test's own target directory (`ergond` is built
//! for this test; `ergon` and `libspank_ergon.so` must have been built before, as
//! `scripts/test` does with `cargo build --workspace --all-targets`): a missing one fails the
//! test with the command that builds it.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const PLUGIN_DIR: &str = "/usr/lib/x86_64-linux-gnu/slurm-wlm";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The directory holding `ergond`, `ergon` and `libspank_ergon.so`: this test's target dir.
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_ergond"))
        .parent()
        .unwrap()
        .to_path_buf();
    for (file, package) in [
        ("ergond", "ergond"),
        ("ergon", "ergon-accounting"),
        ("libspank_ergon.so", "spank-ergon"),
    ] {
        assert!(
            dir.join(file).is_file(),
            "missing input {}: build it first with `cargo build -p {package}` (the plugin needs \
             libslurm-dev and libclang-dev; scripts/test builds the whole workspace first)",
            dir.join(file).display()
        );
    }
    dir
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run `scripts/install` with `args`.
fn install<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(repo().join("scripts/install"))
        .args(args)
        .output()
        .expect("run scripts/install")
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `--no-build --bin-dir <target> --plugin-dir PLUGIN_DIR --destdir <stage>` plus `extra`.
fn staged_install(stage: &Path, extra: &[&str]) -> Output {
    let bins = bin_dir();
    let mut args: Vec<&OsStr> = vec![
        "--no-build".as_ref(),
        "--bin-dir".as_ref(),
        bins.as_os_str(),
        "--plugin-dir".as_ref(),
        PLUGIN_DIR.as_ref(),
        "--destdir".as_ref(),
        stage.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let out = install(&args);
    assert_ok(&out, "scripts/install");
    out
}

/// Every regular file under `root`, as path relative to it → permission bits.
fn files(root: &Path) -> BTreeMap<String, u32> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u32>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                walk(root, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, meta.permissions().mode() & 0o7777);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The page's NAME line (the line after `.SH NAME`).
fn man_name_line(page: &Path) -> String {
    let roff = std::fs::read_to_string(page).unwrap();
    assert!(roff.contains(".TH "), "{}: no .TH", page.display());
    roff.lines()
        .skip_while(|l| *l != ".SH NAME")
        .nth(1)
        .unwrap_or_else(|| panic!("{}: no NAME section:\n{roff}", page.display()))
        .to_owned()
}

/// The NAME line starts with the command (roff escapes `-` as `\-`) and describes it.
fn assert_man_names(page: &Path, command: &str) {
    let line = man_name_line(page);
    let want = format!("{} \\- ", command.replace('-', "\\-"));
    assert!(
        line.starts_with(&want) && line.len() > want.len() + 10,
        "{}: NAME line {line:?} does not name {command}",
        page.display()
    );
}

const SHIPPED: &[(&str, u32)] = &[
    ("usr/sbin/ergond", 0o755),
    ("usr/bin/ergon", 0o755),
    ("usr/lib/x86_64-linux-gnu/slurm-wlm/spank_ergon.so", 0o644),
    ("etc/systemd/system/ergond.service", 0o644),
    ("etc/systemd/system/ergon-accounting.service", 0o644),
    ("etc/systemd/system/ergon-accounting.timer", 0o644),
    ("etc/tmpfiles.d/ergon.conf", 0o644),
    ("etc/ergon/ergond.toml", 0o644),
    ("etc/ergon/accounting.toml", 0o644),
    ("usr/share/man/man8/ergond.8", 0o644),
    ("usr/share/man/man8/ergond-check.8", 0o644),
    ("usr/share/man/man8/ergond-probe.8", 0o644),
    ("usr/share/man/man1/ergon.1", 0o644),
    ("usr/share/man/man1/ergon-run.1", 0o644),
    ("usr/share/man/man1/ergon-status.1", 0o644),
    ("usr/share/man/man1/ergon-report.1", 0o644),
    ("usr/share/ergon/install-manifest", 0o644),
];

/// `systemd-analyze verify` on the staged units, when the command exists. The units name the
/// final paths (`/usr/sbin/ergond`), which do not exist on a build machine: a copy pointing at
/// the staged binaries is verified, with the staged man pages on MANPATH for `Documentation=`.
fn verify_units(stage: &Path) {
    let has_analyze = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_analyze {
        ergon_testkit::skipped(
            "systemd-analyze verify of the units",
            "systemd-analyze not found",
        );
        return;
    }
    let copy = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for unit in [
        "ergond.service",
        "ergon-accounting.service",
        "ergon-accounting.timer",
    ] {
        let staged = std::fs::read_to_string(stage.join("etc/systemd/system").join(unit)).unwrap();
        let local = staged
            .replace(
                "ExecStart=/usr/sbin/ergond",
                &format!("ExecStart={}/usr/sbin/ergond", stage.display()),
            )
            .replace(
                "ExecStart=/usr/bin/ergon ",
                &format!("ExecStart={}/usr/bin/ergon ", stage.display()),
            );
        let path = copy.path().join(unit);
        std::fs::write(&path, local).unwrap();
        paths.push(path);
    }
    // Documentation= is checked with man(1); without it, that part of the check is skipped.
    let has_man = Command::new("man")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_man {
        eprintln!(
            "note: man not found; `systemd-analyze verify --man=no` (Documentation= unchecked)"
        );
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args((!has_man).then_some("--man=no"))
        .args(&paths)
        .env("MANPATH", stage.join("usr/share/man"))
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn staged_install_puts_every_file_in_place_keeps_edited_configs_and_uninstalls() {
    let tmp = tempfile::tempdir().unwrap();
    let stage = tmp.path().join("stage");
    let bins = bin_dir();
    let out = staged_install(&stage, &[]);
    let stdout = text(&out.stdout);

    // Every file, with its mode; nothing else but further man pages of subcommands.
    let got = files(&stage);
    for (path, mode) in SHIPPED {
        assert_eq!(
            got.get(*path),
            Some(mode),
            "{path}: expected mode {mode:o}; staged files: {got:?}"
        );
    }
    for path in got.keys() {
        let known = SHIPPED.iter().any(|(p, _)| p == path)
            || (path.starts_with("usr/share/man/man1/ergon-") && path.ends_with(".1"))
            || (path.starts_with("usr/share/man/man8/ergond-") && path.ends_with(".8"));
        assert!(known, "unexpected file {path}");
    }
    for (staged, built) in [
        ("usr/sbin/ergond", "ergond"),
        ("usr/bin/ergon", "ergon"),
        (
            "usr/lib/x86_64-linux-gnu/slurm-wlm/spank_ergon.so",
            "libspank_ergon.so",
        ),
    ] {
        assert_eq!(
            std::fs::metadata(stage.join(staged)).unwrap().len(),
            std::fs::metadata(bins.join(built)).unwrap().len(),
            "{staged} is not {built}"
        );
    }
    for (path, _) in SHIPPED.iter().filter(|(p, _)| p.starts_with("etc/")) {
        let name = Path::new(path).file_name().unwrap();
        let shipped = if path.starts_with("etc/tmpfiles.d/") {
            repo().join("packaging/tmpfiles.d").join(name)
        } else {
            repo().join("packaging").join(name)
        };
        assert_eq!(
            std::fs::read(stage.join(path)).unwrap(),
            std::fs::read(shipped).unwrap(),
            "{path} differs from packaging/"
        );
    }

    // Man pages: every page names its command.
    for (path, _) in got.iter().filter(|(p, _)| p.starts_with("usr/share/man/")) {
        let command = Path::new(path).file_stem().unwrap().to_str().unwrap();
        assert_man_names(&stage.join(path), command);
    }

    // The service unit: what the systemd integration relies on.
    let unit = std::fs::read_to_string(stage.join("etc/systemd/system/ergond.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/sbin/ergond",
        "WatchdogSec=30",
        "Restart=on-failure",
        "StateDirectory=ergon",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "ergond.service lacks {line}"
        );
    }
    let tmpfiles = std::fs::read_to_string(stage.join("etc/tmpfiles.d/ergon.conf")).unwrap();
    for dir in ["/run/ergon", "/var/spool/ergon", "/var/lib/ergon"] {
        assert!(
            tmpfiles
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(dir)),
            "tmpfiles.d/ergon.conf does not create {dir}"
        );
    }
    verify_units(&stage);

    // The summary prints the plugstack.conf line (the file itself is not touched).
    assert!(
        stdout.contains(&format!(
            "optional {PLUGIN_DIR}/spank_ergon.so socket=/run/ergon/ergond.sock timeout_ms=100"
        )),
        "{stdout}"
    );

    // A second install keeps an edited config and puts the new default beside it.
    let config = stage.join("etc/ergon/ergond.toml");
    let edited = "slurm_user = \"slurm\"\n";
    std::fs::write(&config, edited).unwrap();
    let out = staged_install(&stage, &[]);
    let stdout = text(&out.stdout);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(
        std::fs::read(stage.join("etc/ergon/ergond.toml.dist")).unwrap(),
        std::fs::read(repo().join("packaging/ergond.toml")).unwrap()
    );
    assert!(stdout.contains("/etc/ergon/ergond.toml.dist"), "{stdout}");
    assert!(!stage.join("etc/ergon/accounting.toml.dist").exists());
    assert_eq!(
        files(&stage).get("etc/ergon/ergond.toml.dist").copied(),
        Some(0o644)
    );

    // Uninstall leaves only the configs, the edited one as it was.
    let out = install([
        "--uninstall".as_ref(),
        "--destdir".as_ref(),
        stage.as_os_str(),
    ]);
    assert_ok(&out, "scripts/install --uninstall");
    let left: Vec<String> = files(&stage).into_keys().collect();
    assert_eq!(
        left,
        ["etc/ergon/accounting.toml", "etc/ergon/ergond.toml"],
        "{}",
        text(&out.stdout)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);

    // A second uninstall finds nothing to remove and says so.
    let out = install([
        "--uninstall".as_ref(),
        "--destdir".as_ref(),
        stage.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no install manifest"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn prefix_moves_binaries_and_unit_paths_and_purge_removes_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let stage = tmp.path().join("stage");
    staged_install(&stage, &["--prefix", "/usr/local"]);
    let got = files(&stage);
    assert_eq!(got.get("usr/local/sbin/ergond"), Some(&0o755));
    assert_eq!(got.get("usr/local/bin/ergon"), Some(&0o755));
    assert_eq!(got.get("usr/local/share/man/man8/ergond.8"), Some(&0o644));
    assert!(!stage.join("usr/sbin/ergond").exists());
    let unit = std::fs::read_to_string(stage.join("etc/systemd/system/ergond.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/usr/local/sbin/ergond"),
        "{unit}"
    );
    let acct =
        std::fs::read_to_string(stage.join("etc/systemd/system/ergon-accounting.service")).unwrap();
    assert!(
        acct.lines()
            .any(|l| l == "ExecStart=/usr/local/bin/ergon run --config /etc/ergon/accounting.toml"),
        "{acct}"
    );

    // State directories (created by tmpfiles on a real system) go with --purge too.
    std::fs::create_dir_all(stage.join("var/spool/ergon")).unwrap();
    std::fs::write(stage.join("var/spool/ergon/c-1-n.json"), "{}").unwrap();
    let out = install([
        "--uninstall".as_ref(),
        "--purge".as_ref(),
        "--prefix".as_ref(),
        "/usr/local".as_ref(),
        "--destdir".as_ref(),
        stage.as_os_str(),
    ]);
    assert_ok(&out, "scripts/install --uninstall --purge");
    assert_eq!(files(&stage), BTreeMap::new(), "{}", text(&out.stdout));
    assert!(!stage.join("etc/ergon").exists());
}

#[test]
fn dry_run_prints_the_commands_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let stage = tmp.path().join("stage");
    let out = staged_install(&stage, &["--dry-run"]);
    let stdout = text(&out.stdout);
    assert!(!stage.exists(), "--dry-run created {}", stage.display());
    assert!(
        stdout.contains("[dry-run] install -D -m 0755 -- ")
            && stdout.contains(&format!("{}/usr/sbin/ergond", stage.display())),
        "{stdout}"
    );
    assert!(stdout.contains("nothing was changed"), "{stdout}");
}

#[test]
fn missing_inputs_and_unsafe_paths_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let stage = tmp.path().join("stage");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = install([
        "--no-build".as_ref(),
        "--bin-dir".as_ref(),
        empty.as_os_str(),
        "--destdir".as_ref(),
        stage.as_os_str(),
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("missing input") && stderr.contains("ergond"),
        "{stderr}"
    );
    assert!(!stage.exists());

    let bins = bin_dir();
    let marker = tmp.path().join("pwned");
    for (option, value) in [
        (
            "--plugin-dir",
            format!("/tmp/x$(touch {})", marker.display()),
        ),
        ("--prefix", "usr".to_owned()),
        ("--prefix", "/usr/../etc".to_owned()),
        ("--unit-dir", "/etc/systemd/my units".to_owned()),
    ] {
        let out = install([
            "--no-build".as_ref(),
            "--bin-dir".as_ref(),
            bins.as_os_str(),
            "--destdir".as_ref(),
            stage.as_os_str(),
            option.as_ref(),
            OsStr::new(&value),
        ]);
        assert!(!out.status.success(), "{option} {value:?} accepted");
        assert!(
            text(&out.stderr).contains(option),
            "{option}: {}",
            text(&out.stderr)
        );
        assert!(!stage.exists() && !marker.exists());
    }
    let out = install(["--purge"]);
    assert!(!out.status.success());
    let out = install(["--bogus"]);
    assert!(!out.status.success() && text(&out.stderr).contains("--bogus"));
}

#[test]
fn man_pages_name_their_commands() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ergond"))
        .arg("--generate-man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_ok(&out, "ergond --generate-man");
    for command in ["ergond", "ergond-check", "ergond-probe"] {
        let page = dir.path().join(format!("{command}.8"));
        assert!(std::fs::metadata(&page).unwrap().len() > 0);
        assert_man_names(&page, command);
    }
    for hidden in ["ergond-generate-man.8", "ergond-write-report.8"] {
        assert!(
            !dir.path().join(hidden).exists(),
            "the hidden {hidden} has a page"
        );
    }
    let page = std::fs::read_to_string(dir.path().join("ergond.8")).unwrap();
    assert!(page.contains("\\-\\-config") && page.contains("ergond\\-check(8)"));

    let out = Command::new(bin_dir().join("ergon"))
        .arg("--generate-man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_ok(&out, "ergon --generate-man");
    for command in ["ergon", "ergon-run", "ergon-status", "ergon-report"] {
        assert_man_names(&dir.path().join(format!("{command}.1")), command);
    }
}

/// The packages `scripts/install` builds (`cargo build --release -p …`).
fn installed_packages() -> Vec<String> {
    let script = std::fs::read_to_string(repo().join("scripts/install")).unwrap();
    let line = script
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("build_cmd=(cargo build --release")
        })
        .expect("scripts/install has its build_cmd");
    let words: Vec<&str> = line.split([' ', '(', ')']).collect();
    let packages: Vec<String> = words
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1].to_owned())
        .collect();
    assert!(
        ["ergond", "ergon-accounting", "spank-ergon"]
            .iter()
            .all(|p| packages.iter().any(|q| q == p)),
        "{line}"
    );
    packages
}

/// The release build `scripts/install` makes resolves no test code: no test-support crate, no
/// `testing` feature (cargo unifies features only over the packages a build selects, so the
/// workspace's test crates cannot lend theirs to it).
#[test]
fn the_release_build_of_the_shipped_packages_has_no_test_features() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut tree = Command::new(cargo);
    tree.current_dir(repo())
        .args(["tree", "--locked", "--offline", "-e", "normal,build"])
        .args(["--prefix", "none", "--format", "{p} [{f}]"]);
    for p in installed_packages() {
        tree.args(["-p", &p]);
    }
    let out = tree.output().unwrap();
    assert_ok(&out, "cargo tree");
    let tree = text(&out.stdout);
    assert!(tree.contains("ergon-protocol v"), "{tree}");
    for line in tree.lines() {
        let (package, features) = line.split_once(" [").unwrap_or((line, ""));
        for test_only in ["ergon-testkit", "ergon-tests", "fake-nvml"] {
            assert!(
                !package.starts_with(&format!("{test_only} v")),
                "a shipped build depends on {test_only}:\n{tree}"
            );
        }
        assert!(
            !features.split([',', ']']).any(|f| f == "testing"),
            "a shipped build enables a testing feature: {line}"
        );
    }
}

/// No test-support code is linked into the binaries, even those built for the tests (whose
/// dependencies do have their `testing` features): their symbol tables name none of it.
#[test]
fn the_binaries_contain_no_test_support_code() {
    let dir = bin_dir();
    for bin in ["ergond", "ergon", "libspank_ergon.so"] {
        let out = Command::new("nm")
            .args(["--defined-only", "--demangle"])
            .arg(dir.join(bin))
            .output()
            .expect("run nm (binutils)");
        assert_ok(&out, &format!("nm {bin}"));
        let symbols = text(&out.stdout);
        assert!(
            symbols.contains("ergon_protocol::"),
            "{bin}: no ergon_protocol symbols; is it stripped?"
        );
        for test_only in [
            "ergon_protocol::testing::",
            "ergon_testkit::",
            "ergon_tests::",
        ] {
            let found: Vec<&str> = symbols.lines().filter(|l| l.contains(test_only)).collect();
            assert!(found.is_empty(), "{bin} contains test code: {found:?}");
        }
    }
}

/// Uncomment every `#key = value` and `#[section]` line.
fn uncommented(toml: &str) -> String {
    toml.lines()
        .map(|l| {
            let rest = l.strip_prefix('#').unwrap_or(l);
            let is_setting = rest.starts_with('[')
                || rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                });
            if is_setting {
                rest
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn shipped_configs_are_valid_and_their_commented_keys_are_real_defaults() {
    use ergond::config::Config;
    let shipped = std::fs::read_to_string(repo().join("packaging/ergond.toml")).unwrap();
    assert_eq!(Config::parse(&shipped).unwrap(), Config::default());
    let all = uncommented(&shipped);
    assert!(all.contains("\n[sampling]\n") && all.contains("\nslurm_user = "));
    let parsed = Config::parse(&all).unwrap_or_else(|e| panic!("{e}:\n{all}"));
    assert_eq!(
        parsed,
        Config {
            nvml_library: Some("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1".into()),
            socket_group: Some("slurm".into()),
            // Examples of keys whose default is derived (the host name; beside the socket).
            node_name: Some("gpu017".into()),
            queue_dir: Some("/run/ergon/queue".into()),
            // An example group (none by default).
            private_group: Some("ergonread".into()),
            ..Config::default()
        },
        "a commented value in packaging/ergond.toml is not the default"
    );

    // accounting.toml, through `ergon status` (it only reads): as shipped and uncommented, with
    // the state and spool moved into a temporary directory.
    let tmp = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(repo().join("packaging/accounting.toml")).unwrap();
    let all = uncommented(&shipped);
    assert!(all.contains("\n[http]\n") && all.contains("\nsettle_s = 60"));
    for (name, text_) in [("shipped.toml", shipped.clone()), ("all.toml", all)] {
        let moved = text_
            .replace(
                "/var/lib/ergon",
                &tmp.path().join("state").display().to_string(),
            )
            .replace(
                "/var/spool/ergon",
                &tmp.path().join("spool").display().to_string(),
            );
        let path = tmp.path().join(name);
        std::fs::write(&path, moved).unwrap();
        let out = Command::new(bin_dir().join("ergon"))
            .arg("--config")
            .arg(&path)
            .arg("status")
            .output()
            .unwrap();
        assert_ok(&out, &format!("ergon status with {name}"));
    }
}

/// Datagrams sent to a fake `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    received: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &Path) -> Self {
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self {
            socket,
            received: Vec::new(),
        }
    }

    /// Receive until `done(received)` holds (up to `timeout`); whether it did.
    fn wait_until(&mut self, timeout: Duration, done: impl Fn(&[String]) -> bool) -> bool {
        let end = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if done(&self.received) {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.received.push(text(&buf[..n]));
            }
        }
    }

    /// Receive until `count` messages have a line `want` (up to `timeout`).
    fn wait_for(&mut self, want: &str, count: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |r| {
            r.iter().filter(|m| m.lines().any(|l| l == want)).count() >= count
        })
    }
}

/// The index of the first message with a line for which `pred` holds.
fn position(received: &[String], pred: impl Fn(&str) -> bool) -> Option<usize> {
    received.iter().position(|m| m.lines().any(&pred))
}

#[test]
fn ergond_notifies_systemd_ready_status_watchdog_and_stopping_and_logs_to_the_journal_stream() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    // RAPL only (no NVML library there): enough for the service to start.
    let config = common::write_node(
        dir.path(),
        &dir.path().join("no-nvml/libnvidia-ml.so.1"),
        "127.0.0.1:0",
        "system.slice",
        1000,
        "",
    );
    let notify_path = dir.path().join("notify.sock");
    let mut notify = NotifySocket::bind(&notify_path);
    // stderr is a file whose device:inode JOURNAL_STREAM names, as systemd does for the
    // journal's stream: ergond must take it for the journal.
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ergond"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "600000")
        .env_remove("WATCHDOG_PID")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;

    let ready = notify.wait_for("READY=1", 1, Duration::from_secs(20));
    let pings = ready && notify.wait_for("WATCHDOG=1", 3, Duration::from_secs(10));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM).unwrap();
    let stopping = notify.wait_for("STOPPING=1", 1, Duration::from_secs(20));
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    let received = notify.received.join("---\n");
    assert!(ready, "no READY=1; received:\n{received}\nlog:\n{log}");
    assert!(pings, "fewer than 3 WATCHDOG=1; received:\n{received}");
    assert!(stopping, "no STOPPING=1; received:\n{received}");
    assert_eq!(status.code(), Some(0), "{log}");

    let first = notify.received.first().unwrap();
    assert!(first.lines().any(|l| l == "STATUS=starting"), "{received}");
    let ready_msg = notify
        .received
        .iter()
        .find(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap();
    assert!(
        ready_msg
            .lines()
            .any(|l| l.starts_with("STATUS=sampling 0 GPU(s), ") && l.contains("plugin socket")),
        "{ready_msg}"
    );
    // Readiness comes after the socket exists (it is removed again at the stop).
    let ready_at = notify
        .received
        .iter()
        .position(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap();
    assert!(notify.received[..ready_at]
        .iter()
        .all(|m| !m.contains("WATCHDOG=1")));

    // The log went to the journal, or, where no journald listens, to stderr with a warning.
    if Path::new("/run/systemd/journal/socket").exists() {
        assert!(!log.contains("ergond starting"), "{log}");
    } else {
        assert!(
            log.contains("cannot log to the journal") && log.contains("ergond starting"),
            "{log}"
        );
    }
}

#[test]
fn watchdog_pings_pause_while_the_gpu_sampler_is_stuck_in_a_read() {
    // One GPU whose every NVML read blocks 2.5 s (a hung driver call), a watchdog of 1 s: the
    // GPU source stops ticking for longer than the timeout, so ergond stops pinging and says
    // why in STATUS=; when the read returns, the pings resume.
    let fake = common::FakeNvml::new(serde_json::json!({"gpus": [
        {"uuid": "GPU-5ac0b2f4-0000-4000-8000-000000000001", "name": "Fake H100", "minor": 0,
         "pci_bus_id": "00000000:17:00.0", "profile": {"kind": "constant", "watts": 100.0},
         "update_period_ms": 20.0, "read_delay_us": 2_500_000u64},
    ]}));
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_node(
        dir.path(),
        &fake.lib,
        "127.0.0.1:0",
        "system.slice",
        1000,
        "",
    );
    let notify_path = dir.path().join("notify.sock");
    let mut notify = NotifySocket::bind(&notify_path);
    let log_path = dir.path().join("ergond.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ergond"))
        .arg("--config")
        .arg(&config)
        .args(["--log", "stderr"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let ready = notify.wait_for("READY=1", 1, Duration::from_secs(60));
    let is_stall = |l: &str| l.starts_with("STATUS=sampler stalled: gpu");
    let stalled =
        ready && notify.wait_until(Duration::from_secs(20), |r| position(r, is_stall).is_some());
    let resumed = stalled
        && notify.wait_until(Duration::from_secs(20), |r| {
            let at = position(r, is_stall).unwrap();
            position(&r[at..], |l| l == "WATCHDOG=1").is_some()
        });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let received = notify.received.join("---\n");
    assert!(ready, "no READY=1:\n{received}\nlog:\n{log}");
    assert!(stalled, "no stall reported:\n{received}\nlog:\n{log}");
    assert!(
        log.contains("sampler stalled: gpu") && log.contains("no longer pinging"),
        "{log}"
    );
    assert!(resumed, "pings did not resume:\n{received}\nlog:\n{log}");
    assert_eq!(status.code(), Some(0), "{log}");
}
