//! The user's `--energy-report` writer, `ergond write-report`, run the way ergond runs it: as
//! the user, never through a symlink, never into a FIFO, never over an existing file, within a
//! time bound, and never taken for a success unless the writer says so.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ergond::jobs::report::{Target, WriteError, Writer};

fn writer() -> Writer {
    Writer::new(env!("CARGO_BIN_EXE_ergond"))
}

#[test]
fn writes_as_the_user_and_refuses_symlinks_fifos_and_replacing() {
    let w = writer();
    let dir = tempfile::tempdir().unwrap();
    if !ergon_testkit::is_root() {
        // Not root, the writer cannot become another user: it says so, and writes nothing.
        let f = dir.path().join("r.txt");
        match w.write(&Target::Create(f.clone()), 4242, 4242, b"x") {
            Err(WriteError::Failed { what, errno, .. }) => {
                assert_eq!((what, errno), ("setgroups", libc::EPERM))
            }
            other => panic!("{other:?}"),
        }
        assert!(!f.exists());
        ergon_testkit::needs_root(
            "writes_as_the_user_and_refuses_symlinks_fifos_and_replacing",
            "write as another user",
        );
        return;
    }
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(4242), Some(4242)).unwrap();
    // A new file is created owned by the user.
    let f = home.join("ergon-1.txt");
    w.write(&Target::Create(f.clone()), 4242, 4242, b"hello\n")
        .unwrap();
    let md = std::fs::metadata(&f).unwrap();
    assert_eq!((md.uid(), md.gid()), (4242, 4242));
    // Never replaced.
    let e = w
        .write(&Target::Create(f.clone()), 4242, 4242, b"x")
        .unwrap_err();
    assert!(
        matches!(
            e,
            WriteError::Failed {
                errno: libc::EEXIST,
                ..
            }
        ),
        "{e}"
    );
    // Appended to.
    w.write(&Target::Append(f.clone()), 4242, 4242, b"more\n")
        .unwrap();
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "hello\nmore\n");
    // A symlink to a file the user may not write (root's) is refused, for both kinds.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"root's").unwrap();
    let link = home.join("slurm-1.out");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    for t in [Target::Append(link.clone()), Target::Create(link.clone())] {
        assert!(w.write(&t, 4242, 4242, b"evil").is_err());
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's");
    // A directory the user cannot write: refused by the kernel (it runs as the user).
    let e = w
        .write(
            &Target::Create(dir.path().join("rootfile")),
            4242,
            4242,
            b"x",
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            WriteError::Failed {
                errno: libc::EACCES,
                ..
            }
        ),
        "{e}"
    );
    assert!(!dir.path().join("rootfile").exists());
    // A FIFO is refused without blocking.
    let fifo = home.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    std::os::unix::fs::chown(&fifo, Some(4242), Some(4242)).unwrap();
    let t0 = Instant::now();
    assert!(w.write(&Target::Append(fifo), 4242, 4242, b"x").is_err());
    assert!(t0.elapsed() < Duration::from_secs(2));
    // deliver falls back to the next target.
    let got = w
        .deliver(
            &[
                Target::Append(link),
                Target::Create(home.join("ergon-2.txt")),
            ],
            4242,
            4242,
            "r",
        )
        .unwrap();
    assert_eq!(got, home.join("ergon-2.txt"));
}

/// A FIFO or a directory that the user owns and may write is still refused: a report only ever
/// goes into a regular file.
#[test]
fn a_fifo_with_a_reader_or_a_directory_is_not_written() {
    if !ergon_testkit::needs_root(
        "a_fifo_with_a_reader_or_a_directory_is_not_written",
        "change uid and chown",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(4242), Some(4242)).unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    std::os::unix::fs::chown(&fifo, Some(4242), Some(4242)).unwrap();
    // A reader holds the FIFO open, so opening it for writing succeeds: the type check refuses.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let e = writer()
        .write(&Target::Append(fifo), 4242, 4242, b"x")
        .unwrap_err();
    assert!(matches!(e, WriteError::NotRegular(_)), "{e}");
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut &reader, &mut got);
    assert!(got.is_empty(), "written into the FIFO: {got:?}");
    let e = writer()
        .write(&Target::Append(dir.path().to_path_buf()), 4242, 4242, b"x")
        .unwrap_err();
    assert!(matches!(e, WriteError::Failed { what: "open", .. }), "{e}");
}

use std::os::unix::fs::OpenOptionsExt as _;

/// An executable at `dir/name` running `script` (POSIX sh).
fn program(dir: &Path, name: &str, script: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn a_writer_that_hangs_is_killed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let hang = program(
        dir.path(),
        "hang",
        &format!("echo $$ > {}; exec sleep 600", pid_file.display()),
    );
    let t0 = Instant::now();
    let e = Writer::new(hang)
        .timeout(Duration::from_secs(1))
        .write(&Target::Create(dir.path().join("r.txt")), 4242, 4242, b"x")
        .unwrap_err();
    assert!(matches!(e, WriteError::Timeout(..)), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // The writer is gone (killed and reaped), not left behind.
    let pid = std::fs::read_to_string(&pid_file).expect("the writer started within the timeout");
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "writer {pid} still runs"
    );
}

#[test]
fn a_writer_that_does_not_say_ok_has_not_written() {
    let dir = tempfile::tempdir().unwrap();
    // Exits 0 without answering (as any other program would, given these arguments).
    let silent = program(dir.path(), "silent", "cat > /dev/null; exit 0");
    let e = Writer::new(silent)
        .write(&Target::Create(dir.path().join("r.txt")), 0, 0, b"x")
        .unwrap_err();
    assert!(matches!(e, WriteError::Spawn(_)), "{e}");
    let e = Writer::new(dir.path().join("missing"))
        .write(&Target::Create(dir.path().join("r.txt")), 0, 0, b"x")
        .unwrap_err();
    assert!(matches!(e, WriteError::Spawn(_)), "{e}");
}

/// Private job data: a report file the writer creates is the user's alone (0600); otherwise
/// 0644 as always.
#[test]
fn private_reports_are_created_readable_by_the_user_only() {
    if !ergon_testkit::is_root() {
        ergon_testkit::needs_root(
            "private_reports_are_created_readable_by_the_user_only",
            "write as another user",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(4242), Some(4242)).unwrap();
    let private = home.join("ergon-1.txt");
    writer()
        .private(true)
        .write(&Target::Create(private.clone()), 4242, 4242, b"x\n")
        .unwrap();
    let md = std::fs::metadata(&private).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o777), (4242, 0o600));
    let open = home.join("ergon-2.txt");
    writer()
        .write(&Target::Create(open.clone()), 4242, 4242, b"x\n")
        .unwrap();
    assert_eq!(std::fs::metadata(&open).unwrap().mode() & 0o777, 0o644);
}
