//! The job-records database on a real MariaDB server (Debian's `mariadb-server`, the package
//! slurmdbd needs), started by the test on its own port, socket and data directory: `ergon run`
//! writes it, `ergon report` and `ergon jobs` read it, writes are idempotent, migrations run
//! and a newer schema is refused, a server that is down keeps the records pending, and what
//! the state calls delivered survives a `kill -9` of the server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ergon_accounting::collect::combine;
use ergon_accounting::records::{schema_version, Location, RecordsDb, RecordsError, SINK_NAME};

const MARIADBD: &str = "/usr/sbin/mariadbd";
const INSTALL_DB: &str = "/usr/bin/mariadb-install-db";
const CLIENT: &str = "/usr/bin/mysql";
const PASSWORD: &str = "s3cret pass";

/// A mariadbd of this test's own: data directory, socket and port under a temporary directory.
struct Mariadb {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl Mariadb {
    fn datadir(&self) -> PathBuf {
        self.dir.join("data")
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("mysqld.sock")
    }

    /// Initialise a data directory and start the server, with a user `ergon` (password from
    /// a file) owning the database `ergon_records`.
    fn create(dir: &Path) -> Mariadb {
        for bin in [MARIADBD, INSTALL_DB, CLIENT] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: run scripts/slurm-cluster install (it installs mariadb-server and mariadb-client)"
            );
        }
        let mut db = Mariadb {
            child: None,
            dir: dir.to_path_buf(),
            port: free_port(),
        };
        let out = Command::new(INSTALL_DB)
            .arg("--no-defaults")
            .args(user_flag())
            .arg(format!("--datadir={}", db.datadir().display()))
            .args(["--skip-test-db", "--auth-root-authentication-method=socket"])
            .output()
            .unwrap();
        assert!(out.status.success(), "mariadb-install-db: {}", show(&out));
        db.start();
        db.sql(&format!(
            "CREATE DATABASE ergon_records;
             CREATE USER 'ergon'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';
             GRANT ALL ON ergon_records.* TO 'ergon'@'127.0.0.1';"
        ));
        db
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("mariadb.log")).unwrap();
        let child = Command::new(MARIADBD)
            .arg("--no-defaults")
            .args(user_flag())
            .arg(format!("--datadir={}", self.datadir().display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--port={}", self.port))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("mariadb.pid").display()
            ))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "mariadbd exited at start ({status}): {}",
                    std::fs::read_to_string(self.dir.join("mariadb.log")).unwrap_or_default()
                );
            }
            let ok = self
                .client()
                .args(["-e", "SELECT 1"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "mariadbd did not answer on {} in 60 s",
            self.socket().display()
        );
    }

    /// `kill -9`: no shutdown, no flush beyond what InnoDB did at each commit.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn client(&self) -> Command {
        let mut c = Command::new(CLIENT);
        c.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-uroot", "-N", "-B"]);
        c
    }

    /// Run SQL as root over the socket; stdout.
    fn sql(&self, sql: &str) -> String {
        let out = self.client().args(["-e", sql]).output().unwrap();
        assert!(out.status.success(), "{sql}: {}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn location(&self, password_file: &Path) -> Location {
        Location::Mariadb {
            url: format!("mysql://ergon@127.0.0.1:{}/ergon_records", self.port),
            password_file: Some(password_file.to_path_buf()),
        }
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// mariadbd refuses to run as root unless told to: as root, it runs as root (in the test's own
/// directory, which another user could not enter).
fn user_flag() -> Vec<String> {
    if ergon_testkit::is_root() {
        vec!["--user=root".into()]
    } else {
        vec![]
    }
}

fn mariadb_config(db: &Mariadb, password_file: &Path) -> String {
    format!(
        "[records]\nbackend = \"mariadb\"\nurl = \"mysql://ergon@127.0.0.1:{}/ergon_records\"\npassword_file = {password_file:?}\nbatch_size = 25\n\n[retry]\nmax_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n",
        db.port
    )
}

#[test]
fn mariadb_holds_the_records_as_sqlite_does() {
    let s = Setup::new();
    let mut db = Mariadb::create(&s.dir.path().join("mariadb"));
    let password_file = s.dir.path().join("records.password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let at = db.location(&password_file);

    // Migrations: version 1, then the rest, rows kept; reopening migrates nothing.
    let one = combine(&[manifest("c9", 1, "n1", 10.0, 1.0, 1.0)]);
    {
        let v1 = RecordsDb::open_location(&at, 1).unwrap();
        assert_eq!(v1.version().unwrap(), 1);
        v1.upsert(&[&one]).unwrap();
    }
    let latest = RecordsDb::open_location(&at, schema_version()).unwrap();
    assert_eq!(latest.version().unwrap(), schema_version());
    let indexes = db.sql(
        "SELECT DISTINCT index_name FROM information_schema.statistics WHERE table_schema = 'ergon_records' AND table_name = 'jobs' AND index_name LIKE 'jobs_by_%' ORDER BY index_name",
    );
    assert_eq!(
        indexes.lines().collect::<Vec<_>>(),
        ["jobs_by_account_end", "jobs_by_end", "jobs_by_user_end"]
    );
    assert_eq!(latest.get(Some("c9"), 1).unwrap(), vec![one.clone()]);
    // Idempotent, and a record with fewer nodes never replaces the job.
    let a = manifest("c9", 2, "n1", 100.0, 1.0, 1.0);
    let b = manifest("c9", 2, "n2", 50.0, 1.0, 1.0);
    let early = combine(std::slice::from_ref(&a));
    let late = combine(&[a, b]);
    latest.upsert(&[&late, &late]).unwrap();
    latest.upsert(&[&early]).unwrap();
    assert_eq!(latest.get(None, 2).unwrap(), vec![late]);
    assert_eq!(
        (
            latest.rows("jobs").unwrap(),
            latest.rows("job_nodes").unwrap()
        ),
        (2, 3)
    );
    // A job's CO2e and cost (schema version 3) read back as written.
    let mut green = combine(&[manifest("c9", 3, "n1", 36_000.0, 0.0, 1.0)]);
    let carbon: ergon_accounting::carbon::CarbonConfig =
        toml::from_str("intensity_g_per_kwh = 250\nintensity_source = \"grid\"").unwrap();
    ergon_accounting::carbon::Factors::new(Some(&carbon), None)
        .unwrap()
        .apply(&mut green, &[]);
    latest.upsert(&[&green]).unwrap();
    assert_eq!(latest.get(Some("c9"), 3).unwrap(), vec![green.clone()]);
    let sums = latest
        .summary(
            ergon_accounting::records::SummaryBy::User,
            &ergon_accounting::records::JobFilter {
                cluster: Some("c9".into()),
                ..Default::default()
            },
        )
        .unwrap();
    // 36 kJ = 0.01 kWh at 250 g/kWh.
    let co2e: f64 = sums.iter().filter_map(|r| r.co2e_g).sum();
    assert!((co2e - 2.5).abs() < 1e-9, "{sums:?}");
    drop(latest);

    // `ergon run` into MariaDB; `ergon report` and `ergon jobs` from it.
    s.write_config(&mariadb_config(&db, &password_file));
    let job4 = schema4_job("c1", 41);
    for m in &job4 {
        write_manifest(&s.spool(), m);
    }
    for job in 100..130 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), SINK_NAME), 0);
    let out = s.ergon().args(["report", "41", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["source"], "records", "{v}");
    assert_eq!(
        v["manifests"],
        serde_json::to_value(combine(&job4)).unwrap()
    );
    let out = s
        .ergon()
        .args([
            "jobs",
            "--cluster",
            "c1",
            "--format",
            "json",
            "--limit",
            "5",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 5, "{v}");
    // `ergon summary` from MariaDB: by user and by node, the job count and energy of every
    // job listed.
    let all = s
        .ergon()
        .args(["jobs", "--cluster", "c1", "--format", "json"])
        .output()
        .unwrap();
    let all: serde_json::Value = serde_json::from_slice(&all.stdout).unwrap();
    let listed: f64 = all
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["energy_j"].as_f64().unwrap())
        .sum();
    for by in ["user", "node"] {
        let out = s
            .ergon()
            .args(["summary", "--by", by, "--cluster", "c1", "--format", "json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", show(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let energy = v["total"]["energy_j"].as_f64().unwrap();
        assert!(
            (energy - listed).abs() < 1e-6 * listed,
            "by {by}: {energy} vs {listed}: {v}"
        );
        if by == "user" {
            assert_eq!(v["total"]["jobs"], all.as_array().unwrap().len(), "{v}");
        }
    }

    // A newer schema is refused and left as it is.
    db.sql(&format!(
        "UPDATE ergon_records.ergon_schema SET version = {}",
        schema_version() + 1
    ));
    let err = RecordsDb::open_location_read_only(&at).unwrap_err();
    assert!(matches!(err, RecordsError::TooNew { .. }), "{err}");
    db.sql(&format!(
        "UPDATE ergon_records.ergon_schema SET version = {}",
        schema_version()
    ));

    // A wrong password: the run goes on without the database, its records pending (exit 3),
    // and the message says what to check, without the password.
    let wrong = s.dir.path().join("wrong.password");
    std::fs::write(&wrong, "nope").unwrap();
    s.write_config(&mariadb_config(&db, &wrong));
    write_manifest(&s.spool(), &manifest("c1", 200, "n1", 1.0, 1.0, 1.0));
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let text = show(&out);
    assert!(text.contains("records.password_file"), "{text}");
    assert!(!text.contains("nope") && !text.contains(PASSWORD), "{text}");
    assert_eq!(backlog(&s.status_json(), SINK_NAME), 1);

    // The server down: the same; back up: the next run writes what is pending.
    s.write_config(&mariadb_config(&db, &password_file));
    db.kill();
    write_manifest(&s.spool(), &manifest("c1", 201, "n1", 1.0, 1.0, 1.0));
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), SINK_NAME), 2);
    db.start();
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), SINK_NAME), 0);

    // `kill -9` of the server right after the run: every record the state calls delivered is
    // there after the restart (InnoDB commits are on disk), each once.
    db.kill();
    db.start();
    let check = RecordsDb::open_location_read_only(&at).unwrap();
    // c9/1, c9/2, c9/3, c1/41, 30 jobs of c1 from 100, c1/200, c1/201.
    assert_eq!(check.count().unwrap(), 3 + 1 + 30 + 2);
    for job in [100, 129, 200, 201] {
        let got = check.get(Some("c1"), job).unwrap();
        assert_eq!(got.len(), 1, "job {job}");
    }
    assert_eq!(
        db.sql("SELECT COUNT(*) FROM ergon_records.jobs WHERE cluster = 'c1'")
            .trim(),
        "33"
    );
}
