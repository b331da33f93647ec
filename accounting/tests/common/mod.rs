//! Shared by the service tests: manifests, configs, running the `ergon` binary, and a small
//! HTTPS ingest server.
#![allow(dead_code)]

pub mod victoria;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ergon_protocol::manifest::*;
use ergon_protocol::testing::ManifestBuilder;

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A sealed manifest for `job` on `node` with the given energies: one GPU and one socket over
/// 100 s that ended a minute ago (so `settle_s` has passed).
pub fn manifest(
    cluster: &str,
    job: u32,
    node: &str,
    gpu_j: f64,
    cpu_j: f64,
    coverage: f64,
) -> Manifest {
    ManifestBuilder::new(cluster, job, node)
        .account("phys")
        .partition("gpu")
        .ended(now_ns() - 60_000_000_000, 100)
        .gpu(Some(gpu_j))
        .socket(cpu_j, None)
        .batch_step()
        .coverage(coverage)
        .build()
}

/// Write a manifest into `spool` as `<job>.<node>.json`.
pub fn write_manifest(spool: &Path, m: &Manifest) -> PathBuf {
    let path = spool.join(format!("{}.{}.json", m.job.job_id, m.node));
    std::fs::write(&path, m.to_json().unwrap()).unwrap();
    path
}

/// A test setup: spool, quarantine and state directories under one temp dir.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn new() -> Setup {
        let s = Setup {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(s.spool()).unwrap();
        s
    }
    pub fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }
    pub fn quarantine(&self) -> PathBuf {
        self.dir.path().join("quarantine")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("accounting.toml")
    }
    /// Write the config: the common part plus `extra` TOML (sections).
    pub fn write_config(&self, extra: &str) {
        let text = format!(
            "spool_dirs = [{:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\n[sacct]\nenabled = false\n\n{extra}",
            self.spool(),
            self.quarantine(),
            self.state()
        );
        std::fs::write(self.config_path(), text).unwrap();
    }
    pub fn ergon(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ergon"));
        c.arg("--config").arg(self.config_path());
        c
    }
    pub fn run(&self) -> Output {
        self.ergon().arg("run").output().unwrap()
    }
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.ergon().args(["status", "--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

pub fn backlog(status: &serde_json::Value, sink: &str) -> u64 {
    status["backlog"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[0] == sink)
        .map(|e| e[1].as_u64().unwrap())
        .unwrap_or(0)
}

pub fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request the ingest server received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: std::time::Instant,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
    pub status: u16,
}

/// A canned answer: status and extra headers.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: vec![],
        }
    }
    pub fn retry_after(secs: u64) -> Answer {
        Answer {
            status: 429,
            headers: vec![("Retry-After".into(), secs.to_string())],
        }
    }
}

/// An HTTPS server on loopback with a CA made for it: answers requests with the scripted
/// answers in order, then with `then`, and records every request.
pub struct IngestServer {
    pub port: u16,
    pub ca_pem: String,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl IngestServer {
    pub fn start(script: Vec<Answer>, then: Answer) -> IngestServer {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ergon test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        std::thread::spawn(move || {
            let mut script = script.into_iter();
            for stream in listener.incoming() {
                let Ok(tcp) = stream else { continue };
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let answer = script.next().unwrap_or_else(|| then.clone());
                // Requests are served one per connection (answers say Connection: close).
                let Some((authorization, body)) = read_request(&mut tls) else {
                    continue;
                };
                rec.lock().unwrap().push(Received {
                    at: std::time::Instant::now(),
                    authorization,
                    body,
                    status: answer.status,
                });
                let mut head = format!(
                    "HTTP/1.1 {} X\r\nContent-Length: 2\r\nConnection: close\r\n",
                    answer.status
                );
                for (k, v) in &answer.headers {
                    head += &format!("{k}: {v}\r\n");
                }
                head += "\r\n{}";
                let _ = tls.write_all(head.as_bytes());
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        IngestServer {
            port,
            ca_pem: ca.pem(),
            received,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/ingest", self.port)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// One HTTP/1.1 request from `stream`: its `Authorization` header, if any, and its body.
pub fn read_request<S: Read>(stream: &mut S) -> Option<(Option<String>, Vec<u8>)> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    if line.is_empty() {
        return None;
    }
    let mut length = 0usize;
    let mut authorization = None;
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim().to_string();
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.parse().ok()?,
                "authorization" => authorization = Some(v),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((authorization, body))
}

/// The idempotency keys in an ingest request body.
pub fn keys_in(body: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["schema"], "ergon.job-records/1");
    v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["idempotency_key"].as_str().unwrap().to_string())
        .collect()
}

/// What a schema 4 manifest adds, for [`manifest_v4`].
#[derive(Debug, Clone, Default)]
pub struct V4 {
    pub components: Option<ComponentCoverage>,
    pub gpus_unknown: Option<String>,
    /// `(energy_j, bound_j)` of one estimated gap.
    pub estimate: Option<(f64, f64)>,
    pub sluid: Option<String>,
    /// The job's length on the node, seconds (default 100).
    pub duration_s: Option<u64>,
}

/// A sealed schema 4 manifest: [`manifest`] with `v4`'s fields. With `gpus_unknown` the node
/// has no GPU entries and no GPU energy (ergond could not know the job's GPUs), and its
/// coverage is the lowest of its components, as ergond writes it.
pub fn manifest_v4(cluster: &str, job: u32, node: &str, cpu_j: f64, v4: V4) -> Manifest {
    let mut m = manifest(cluster, job, node, 40.0 * cpu_j, cpu_j, 1.0);
    m.schema_version = MANIFEST_SCHEMA_VERSION_COVERAGE;
    if let Some(d) = v4.duration_s {
        m.start_unix_ns = m.end_unix_ns - d * 1_000_000_000;
        m.duration_s = d as f64;
    }
    if v4.gpus_unknown.is_some() {
        m.gpus.clear();
        m.totals.gpu_j = None;
        m.steps[0].gpu_j = None;
        m.totals.energy_j = cpu_j;
        m.steps[0].energy_j = cpu_j;
    }
    m.coverage.components = v4.components;
    if let Some(c) = v4.components {
        m.coverage.fraction = c.lowest();
    }
    m.coverage.gpus_unknown = v4.gpus_unknown;
    if let Some((energy_j, bound_j)) = v4.estimate {
        let mut gap = Gap::new(
            m.start_unix_ns + 10_000_000_000,
            m.start_unix_ns + 20_000_000_000,
            "ergond was not running (killed or restarted); split by estimate",
            true,
        );
        gap.estimate = Some(GapEstimate { energy_j, bound_j });
        m.coverage.gaps.push(gap);
        m.attribution.estimated = true;
    }
    m.job.sluid = v4.sluid;
    m.seal();
    m
}

/// Job `job`'s two schema 4 manifests: `n1` with CPU coverage 0.8 and an estimate (50 J ± 5 J),
/// `n2` whose GPUs are unknown and an estimate (10 J ± 2.5 J), both with a SLUID.
pub fn schema4_job(cluster: &str, job: u32) -> [Manifest; 2] {
    [
        manifest_v4(
            cluster,
            job,
            "n1",
            10.0,
            V4 {
                components: Some(ComponentCoverage {
                    gpu: Some(1.0),
                    cpu: Some(0.8),
                    dram: None,
                }),
                estimate: Some((50.0, 5.0)),
                sluid: Some("s2gxm9475ceh00".into()),
                duration_s: Some(100),
                ..V4::default()
            },
        ),
        manifest_v4(
            cluster,
            job,
            "n2",
            20.0,
            V4 {
                components: Some(ComponentCoverage {
                    gpu: Some(0.0),
                    cpu: Some(1.0),
                    dram: None,
                }),
                gpus_unknown: Some("NVML failed to initialise".into()),
                estimate: Some((10.0, 2.5)),
                sluid: Some("s2gxm9475ceh00".into()),
                duration_s: Some(300),
            },
        ),
    ]
}

/// A plain-HTTP `/write` endpoint standing in for VictoriaMetrics: records the job ids of each
/// request it accepts (answers 204). With `stall_at = Some(n)` it announces the `n`th request on
/// the channel and leaves it (and every later request) unanswered until `release` is called;
/// they are recorded then.
pub struct Receiver {
    pub port: u16,
    /// Job ids per accepted request.
    accepted: Arc<Mutex<Vec<Vec<u32>>>>,
    stalled: Arc<Mutex<bool>>,
}

impl Receiver {
    pub fn start(stall_at: Option<usize>, announce: mpsc::Sender<()>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stalled = Arc::new(Mutex::new(false));
        let (acc, st) = (accepted.clone(), stalled.clone());
        let seen = Arc::new(AtomicUsize::new(0));
        let announce = Arc::new(Mutex::new(announce));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut tcp) = stream else { continue };
                let (acc, st, seen, announce) =
                    (acc.clone(), st.clone(), seen.clone(), announce.clone());
                std::thread::spawn(move || loop {
                    // Keep-alive: serve requests on this connection until it closes.
                    let Some((_, body)) = read_request(&mut tcp) else {
                        return;
                    };
                    if stall_at == Some(seen.fetch_add(1, Ordering::SeqCst) + 1) {
                        *st.lock().unwrap() = true;
                        let _ = announce.lock().unwrap().send(());
                    }
                    while *st.lock().unwrap() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let jobs: Vec<u32> = String::from_utf8_lossy(&body)
                        .lines()
                        .filter_map(|l| {
                            let rest = l.split_once(",job_id=")?.1;
                            rest.split(',').next()?.parse().ok()
                        })
                        .collect();
                    acc.lock().unwrap().push(jobs);
                    if tcp
                        .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                });
            }
        });
        Receiver {
            port,
            accepted,
            stalled,
        }
    }

    pub fn release(&self) {
        *self.stalled.lock().unwrap() = false;
    }

    /// How many times each job id arrived.
    pub fn per_job(&self) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        for jobs in self.accepted.lock().unwrap().iter() {
            for j in jobs {
                *out.entry(*j).or_insert(0) += 1;
            }
        }
        out
    }

    pub fn requests(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}
