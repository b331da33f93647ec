//! The HTTPS JSON ingest sink against a TLS server run by the test (its own CA, a bearer token
//! from a file).

mod common;

use std::time::{Duration, Instant};

use common::*;

fn http_config(s: &Setup, server: &IngestServer, extra: &str) {
    let ca = s.dir.path().join("ca.pem");
    std::fs::write(&ca, &server.ca_pem).unwrap();
    let token = s.dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    s.write_config(&format!(
        "[retry]\nmax_attempts = 6\ninitial_backoff_ms = 100\nmax_backoff_ms = 400\n\n[http]\nurl = \"{}\"\ntoken_file = {:?}\nca_bundle = {:?}\nbatch_size = 100\ntimeout_s = 10\n{extra}",
        server.url(),
        token,
        ca
    ));
}

#[test]
fn retry_after_then_server_errors_then_success_delivers_once() {
    let server = IngestServer::start(
        vec![
            Answer::retry_after(2),
            Answer::status(500),
            Answer::status(503),
        ],
        Answer::status(200),
    );
    let s = Setup::new();
    http_config(&s, &server, "");
    for job in 1..=5 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", 10.0, 1.0, 1.0));
    }
    let start = Instant::now();
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let got = server.received();
    assert_eq!(
        got.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 500, 503, 200]
    );
    // The Retry-After wait was honoured.
    assert!(
        got[1].at - got[0].at >= Duration::from_secs(2),
        "{:?}",
        got[1].at - got[0].at
    );
    assert!(start.elapsed() >= Duration::from_secs(2));
    for r in &got {
        assert_eq!(r.authorization.as_deref(), Some("Bearer s3cret-token"));
        assert_eq!(keys_in(&r.body).len(), 5);
    }
    let mut keys = keys_in(&got[3].body);
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 5);

    // Delivered once: another run sends nothing.
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(server.received().len(), 4);
    let status = s.status_json();
    assert_eq!(backlog(&status, "http"), 0);
}

#[test]
fn refused_credentials_stop_the_sink_loudly_and_keep_records_pending() {
    let server = IngestServer::start(vec![], Answer::status(401));
    let s = Setup::new();
    http_config(&s, &server, "");
    write_manifest(&s.spool(), &manifest("c1", 1, "n1", 10.0, 1.0, 1.0));
    let out = s.run();
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("STOPPED"),
        "{}",
        show(&out)
    );
    // No retries on 401.
    assert_eq!(server.received().len(), 1);
    assert_eq!(backlog(&s.status_json(), "http"), 1);
}

#[test]
fn an_unknown_ca_is_not_trusted() {
    let server = IngestServer::start(vec![], Answer::status(200));
    let other = IngestServer::start(vec![], Answer::status(200));
    let s = Setup::new();
    http_config(&s, &server, "");
    // Point the CA bundle at another CA.
    std::fs::write(s.dir.path().join("ca.pem"), &other.ca_pem).unwrap();
    std::fs::write(
        s.config_path(),
        std::fs::read_to_string(s.config_path())
            .unwrap()
            .replace("max_attempts = 6", "max_attempts = 1"),
    )
    .unwrap();
    write_manifest(&s.spool(), &manifest("c1", 1, "n1", 10.0, 1.0, 1.0));
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(server.received().is_empty());
}

#[test]
fn two_runs_at_once_one_exits_cleanly_nothing_doubled() {
    // The first run waits out a Retry-After while holding the lock.
    let server = IngestServer::start(vec![Answer::retry_after(2)], Answer::status(200));
    let s = Setup::new();
    http_config(&s, &server, "");
    for job in 1..=3 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", 10.0, 1.0, 1.0));
    }
    let first = s.ergon().arg("run").spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.received().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = s.run();
    assert_eq!(second.status.code(), Some(75), "{}", show(&second));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("holds the lock"),
        "{}",
        show(&second)
    );
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0));
    let got = server.received();
    assert_eq!(got.len(), 2);
    assert_eq!(keys_in(&got[1].body).len(), 3);
    // And afterwards nothing is sent again.
    assert_eq!(s.run().status.code(), Some(0));
    assert_eq!(server.received().len(), 2);
}

/// `ergon run` on a terminal shows a progress bar for a large backlog, and none when its
/// output is not a terminal (cron, a pipe). The terminal is a real pseudo-terminal from
/// `script(1)`.
#[test]
fn a_large_backlog_shows_a_progress_bar_on_a_terminal_only() {
    let server = IngestServer::start(vec![], Answer::status(200));
    let s = Setup::new();
    http_config(&s, &server, "");
    for job in 1..=300 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", 10.0, 1.0, 1.0));
    }
    let cmd = format!(
        "{} --config {} run",
        env!("CARGO_BIN_EXE_ergon"),
        s.config_path().display()
    );
    // script -q -e: quiet, the command's exit status; -c: the command; the transcript to
    // /dev/null and the terminal's output on our stdout.
    let out = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .output()
        .expect("script(1) from util-linux");
    let tty = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tty}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        tty.contains("/300") && tty.contains("http"),
        "no progress bar on the terminal:\n{tty}"
    );
    assert_eq!(keys_in_all(&server), 300);

    // Not a terminal: no bar.
    let s2 = Setup::new();
    http_config(&s2, &server, "");
    for job in 1..=300 {
        write_manifest(&s2.spool(), &manifest("c2", job, "n1", 10.0, 1.0, 1.0));
    }
    let out = s2.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = show(&out);
    assert!(
        !text.contains("/300"),
        "a progress bar without a terminal:\n{text}"
    );
}

fn keys_in_all(server: &IngestServer) -> usize {
    let mut keys: Vec<String> = server
        .received()
        .iter()
        .filter(|r| r.status == 200)
        .flat_map(|r| keys_in(&r.body))
        .collect();
    keys.sort();
    keys.dedup();
    keys.len()
}

/// A plain-HTTP endpoint: answers 200 to every request and records each one's `Authorization`.
fn plain_http_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut tcp) = stream else { continue };
            while let Some((authorization, _)) = read_request(&mut tcp) {
                rec.lock().unwrap().push(authorization);
                use std::io::Write as _;
                if tcp
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    (port, seen)
}

#[test]
fn a_token_is_not_sent_over_plain_http_unless_allowed() {
    let (port, seen) = plain_http_server();
    let s = Setup::new();
    let token = s.dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let config = |extra: &str| {
        s.write_config(&format!(
            "[http]\nurl = \"http://127.0.0.1:{port}/ingest\"\ntoken_file = {token:?}\n{extra}"
        ))
    };
    write_manifest(&s.spool(), &manifest("c1", 1, "n1", 10.0, 1.0, 1.0));

    config("");
    let out = s.run();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plain http://") && stderr.contains("allow_token_over_plain_http"),
        "{stderr}"
    );
    assert!(seen.lock().unwrap().is_empty(), "nothing was sent");
    assert!(
        !stderr.contains("s3cret"),
        "the token is not printed: {stderr}"
    );

    // Explicitly allowed (a trusted path): sent, with a warning.
    config("allow_token_over_plain_http = true\n");
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("over plain http://"),
        "{}",
        show(&out)
    );
    assert_eq!(
        *seen.lock().unwrap(),
        [Some("Bearer s3cret-token".to_string())]
    );

    // Without a token, plain http needs no permission.
    let s2 = Setup::new();
    s2.write_config(&format!(
        "[http]\nurl = \"http://127.0.0.1:{port}/ingest\"\n"
    ));
    write_manifest(&s2.spool(), &manifest("c1", 2, "n1", 10.0, 1.0, 1.0));
    let out = s2.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(seen.lock().unwrap().last(), Some(&None));
}

/// A schema 4 job's JSON record carries per-component coverage, the nodes whose GPUs are
/// unknown (with the reason), each estimated gap with its bound, and the SLUID.
#[test]
fn a_schema_4_job_is_sent_with_what_it_says() {
    let server = IngestServer::start(vec![], Answer::status(200));
    let s = Setup::new();
    http_config(&s, &server, "");
    for m in schema4_job("c1", 12) {
        write_manifest(&s.spool(), &m);
    }
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let got = server.received();
    assert_eq!(got.len(), 1);
    let v: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    let r = &v["records"][0];
    assert_eq!(r["sluid"], "s2gxm9475ceh00", "{r}");
    assert_eq!(r["coverage_components"]["gpu"].as_f64(), Some(0.25), "{r}");
    assert_eq!(r["coverage_components"]["cpu"].as_f64(), Some(0.95), "{r}");
    assert_eq!(r["gpus_unknown"][0]["node"], "n2");
    assert_eq!(r["gpus_unknown"][0]["reason"], "NVML failed to initialise");
    assert_eq!(r["estimate_bound_j"].as_f64(), Some(7.5));
    assert_eq!(r["estimates"][0]["bound_j"].as_f64(), Some(5.0));
    assert_eq!(r["estimates"][1]["energy_j"].as_f64(), Some(10.0));
    assert_eq!(r["nodes"][1]["components"]["gpu"].as_f64(), Some(0.0));
}

/// With `[carbon]` and `[cost]`, the uploaded record carries the job's footprint: the figures
/// and the factors they were computed with.
#[test]
fn the_upload_carries_co2e_and_cost_with_their_factors() {
    let server = IngestServer::start(vec![], Answer::status(200));
    let s = Setup::new();
    http_config(
        &s,
        &server,
        "\n[carbon]\nintensity_g_per_kwh = 400\nintensity_source = \"grid 2025\"\npue = 1.5\n\n\
         [cost]\ncurrency = \"EUR\"\nprice_per_kwh = 0.3\ninclude_pue = false\n",
    );
    // 100 J GPU + 10 J CPU = 110 J.
    write_manifest(&s.spool(), &manifest("c1", 13, "n1", 100.0, 10.0, 1.0));
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let got = server.received();
    let v: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    let f = &v["records"][0]["footprint"];
    let kwh = 110.0 / 3.6e6;
    let g = f["carbon"]["operational_g"].as_f64().unwrap();
    assert!((g - kwh * 1.5 * 400.0).abs() < 1e-12, "{f}");
    assert_eq!(f["carbon"]["intensity"]["source"], "grid 2025");
    assert_eq!(f["carbon"]["intensity"]["value"], 400.0);
    let cost = f["cost"]["amount"].as_f64().unwrap();
    assert!((cost - kwh * 0.3).abs() < 1e-15, "{f}");
    assert!(f["cost"].get("pue").is_none(), "{f}");
    // No trace in this manifest: the record says the energy was spread evenly.
    assert_eq!(f["method"], "even");
}
