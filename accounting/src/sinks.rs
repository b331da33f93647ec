//! Upload sinks and the retry policy they share.
//!
//! A sink sends one batch per request and says what happened ([`SendOutcome`]); the policy in
//! [`deliver_batch`] decides whether to wait and retry (exponential backoff with jitter; the
//! server's `Retry-After` on 429), to stop the sink for this run (credentials refused, a request
//! the server rejects, too many attempts), or to go on. What is not delivered stays pending in the
//! state for the next run.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde::Serialize;

use crate::config::{HttpConfig, RetryConfig, VictoriaMetricsConfig};
use crate::job::JobRecordFull;

/// What one request achieved.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// Accepted.
    Delivered,
    /// Worth retrying (5xx, 429, connection error, timeout); `after` is the server's
    /// `Retry-After`, if it gave one.
    Retry {
        /// Server-requested wait.
        after: Option<Duration>,
        /// What went wrong.
        error: String,
    },
    /// Credentials refused (401/403): the sink stops until an admin fixes it.
    AuthRefused(String),
    /// The server rejected the request in a way a retry will not change (other 4xx).
    Rejected(String),
}

/// A destination for job records.
pub trait Sink {
    /// The name used in the state and in messages.
    fn name(&self) -> &str;
    /// Records per request.
    fn batch_size(&self) -> usize;
    /// Send one batch.
    fn send(&self, records: &[&JobRecordFull]) -> SendOutcome;
}

/// How a batch ended.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchResult {
    /// Delivered after this many attempts.
    Delivered {
        /// Attempts used.
        attempts: u32,
    },
    /// Not delivered; the sink stops for this run. `auth` is true for 401/403.
    Stopped {
        /// The last error.
        error: String,
        /// Whether credentials were refused.
        auth: bool,
    },
}

/// The wait before retry number `attempt` (0-based): `initial * 2^attempt`, capped, then
/// "equal jitter" (half fixed, half random) so that many clients do not retry in step.
pub fn backoff(retry: &RetryConfig, attempt: u32, random: f64) -> Duration {
    let base = retry
        .initial_backoff_ms
        .saturating_mul(1u64 << attempt.min(30))
        .min(retry.max_backoff_ms);
    let half = base / 2;
    Duration::from_millis(half + (half as f64 * random.clamp(0.0, 1.0)) as u64)
}

/// A small xorshift generator for jitter, seeded from the clock and pid (jitter needs no
/// cryptographic quality).
fn jitter_random() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            (t ^ (u64::from(std::process::id()) << 32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// Send one batch with retries, sleeping with `sleep` between attempts.
pub fn deliver_batch(
    sink: &dyn Sink,
    records: &[&JobRecordFull],
    retry: &RetryConfig,
    sleep: &mut dyn FnMut(Duration),
) -> BatchResult {
    let mut attempt = 0;
    loop {
        let outcome = sink.send(records);
        attempt += 1;
        match outcome {
            SendOutcome::Delivered => return BatchResult::Delivered { attempts: attempt },
            SendOutcome::AuthRefused(error) => return BatchResult::Stopped { error, auth: true },
            SendOutcome::Rejected(error) => return BatchResult::Stopped { error, auth: false },
            SendOutcome::Retry { after, error } => {
                if attempt >= retry.max_attempts {
                    return BatchResult::Stopped {
                        error: format!("{error} (gave up after {attempt} attempts this run)"),
                        auth: false,
                    };
                }
                let wait = match after {
                    Some(after) if after > Duration::from_secs(retry.max_retry_after_s) => {
                        return BatchResult::Stopped {
                            error: format!(
                                "{error}; the server asked to wait {}s, more than retry.max_retry_after_s",
                                after.as_secs()
                            ),
                            auth: false,
                        }
                    }
                    Some(after) => after,
                    None => backoff(retry, attempt - 1, jitter_random()),
                };
                tracing::warn!(
                    "{}: {error}; retrying in {:.1}s (attempt {}/{})",
                    sink.name(),
                    wait.as_secs_f64(),
                    attempt + 1,
                    retry.max_attempts
                );
                sleep(wait);
            }
        }
    }
}

/// Classify an HTTP response.
fn classify(status: StatusCode, retry_after: Option<&str>, body: &str) -> SendOutcome {
    let snippet: String = body.chars().take(200).collect();
    if status.is_success() {
        SendOutcome::Delivered
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        SendOutcome::AuthRefused(format!(
            "the server refused the credentials ({status}): {snippet}; check the token file"
        ))
    } else if status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
    {
        SendOutcome::Retry {
            after: retry_after.and_then(parse_retry_after),
            error: format!("server answered {status}: {snippet}"),
        }
    } else {
        SendOutcome::Rejected(format!("server rejected the batch ({status}): {snippet}"))
    }
}

/// `Retry-After` in either form RFC 9110 allows: delay-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2026 07:28:00 GMT`, the wait until then; a date in the past means now).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    retry_after_at(value, std::time::SystemTime::now())
}

fn retry_after_at(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn send_request(request: reqwest::blocking::RequestBuilder) -> SendOutcome {
    match request.send() {
        Ok(response) => {
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response.text().unwrap_or_default();
            classify(status, retry_after.as_deref(), &body)
        }
        Err(e) => SendOutcome::Retry {
            after: None,
            error: format!("request failed: {e:#}"),
        },
    }
}

/// InfluxDB line protocol to VictoriaMetrics' `/write`.
///
/// One line per job: measurement `ergon_job`, tags `cluster`, `job_id`, `user` and, when set,
/// `account` and `partition`; fields `energy_j`, `gpu_j`, `cpu_j`, `dram_j` (when measured),
/// `avg_w`, `peak_w`, `coverage_min`, `coverage_weighted`, `duration_s`, `nodes`, `gpus`; the
/// timestamp is the job's end in nanoseconds. VictoriaMetrics names the series
/// `ergon_job_<field>`. The same record sent twice has the same series and timestamp.
pub struct VictoriaMetrics {
    client: Client,
    url: String,
    batch_size: usize,
}

impl VictoriaMetrics {
    /// A sink for the configured server.
    pub fn new(config: &VictoriaMetricsConfig) -> anyhow::Result<Self> {
        let client = Client::builder()
            .timeout(Duration::from_secs(config.timeout_s))
            .connect_timeout(Duration::from_secs(config.timeout_s.min(10)))
            .build()?;
        Ok(VictoriaMetrics {
            client,
            url: format!("{}/write", config.url.trim_end_matches('/')),
            batch_size: config.batch_size,
        })
    }
}

fn escape_tag(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, ',' | '=' | ' ' | '\\') {
            out.push('\\');
        }
        if c == '\n' {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// The line protocol text for `records`.
pub fn line_protocol(records: &[&JobRecordFull]) -> String {
    let mut out = String::with_capacity(records.len() * 256);
    for r in records {
        let _ = write!(
            out,
            "ergon_job,cluster={},job_id={},user={}",
            escape_tag(&r.cluster),
            r.job_id,
            escape_tag(&r.user)
        );
        for (tag, value) in [("account", &r.account), ("partition", &r.partition)] {
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                let _ = write!(out, ",{tag}={}", escape_tag(v));
            }
        }
        let _ = write!(out, " energy_j={}", r.energy_j);
        for (field, value) in [("gpu_j", r.gpu_j), ("cpu_j", r.cpu_j), ("dram_j", r.dram_j)] {
            if let Some(v) = value {
                let _ = write!(out, ",{field}={v}");
            }
        }
        let _ = writeln!(
            out,
            ",avg_w={},peak_w={},coverage_min={},coverage_weighted={},duration_s={},nodes={},gpus={} {}",
            r.avg_w,
            r.peak_w,
            r.coverage_min,
            r.coverage_weighted,
            r.duration_s,
            r.nodes.len(),
            r.gpus.len(),
            r.end_unix_ns
        );
    }
    out
}

impl Sink for VictoriaMetrics {
    fn name(&self) -> &str {
        "victoria_metrics"
    }
    fn batch_size(&self) -> usize {
        self.batch_size
    }
    fn send(&self, records: &[&JobRecordFull]) -> SendOutcome {
        send_request(
            self.client
                .post(&self.url)
                .header("Content-Type", "text/plain; charset=utf-8")
                .body(line_protocol(records)),
        )
    }
}

/// The JSON body POSTed to the HTTPS ingest endpoint (see docs/accounting.md).
#[derive(Debug, Serialize)]
pub struct IngestBatch<'a> {
    /// Always `"ergon.job-records/1"`.
    pub schema: &'static str,
    /// The records.
    pub records: &'a [&'a JobRecordFull],
}

/// The schema name in [`IngestBatch`].
pub const INGEST_SCHEMA: &str = "ergon.job-records/1";

/// Generic HTTPS JSON ingest.
pub struct HttpIngest {
    client: Client,
    url: String,
    token: Option<String>,
    batch_size: usize,
}

impl HttpIngest {
    /// A sink for the configured endpoint. Reads the token file and CA bundle now, so that a
    /// missing file fails the run early with its path.
    pub fn new(config: &HttpConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let mut builder = Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(config.timeout_s))
            .connect_timeout(Duration::from_secs(config.connect_timeout_s));
        if let Some(ca) = &config.ca_bundle {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading http.ca_bundle {}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("http.ca_bundle {} is not a PEM bundle", ca.display()))?;
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let token = config.token_file.as_deref().map(read_token).transpose()?;
        Ok(HttpIngest {
            client: builder.build()?,
            url: config.url.clone(),
            token,
            batch_size: config.batch_size,
        })
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading http.token_file {}", path.display()))?;
    let token = text.trim().to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "http.token_file {} is empty",
        path.display()
    );
    Ok(token)
}

impl Sink for HttpIngest {
    fn name(&self) -> &str {
        "http"
    }
    fn batch_size(&self) -> usize {
        self.batch_size
    }
    fn send(&self, records: &[&JobRecordFull]) -> SendOutcome {
        let body = IngestBatch {
            schema: INGEST_SCHEMA,
            records,
        };
        let mut request = self.client.post(&self.url).json(&body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        send_request(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Scripted {
        outcomes: RefCell<Vec<SendOutcome>>,
        calls: RefCell<u32>,
    }

    impl Sink for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn batch_size(&self) -> usize {
            10
        }
        fn send(&self, _: &[&JobRecordFull]) -> SendOutcome {
            *self.calls.borrow_mut() += 1;
            self.outcomes.borrow_mut().remove(0)
        }
    }

    fn retry() -> RetryConfig {
        RetryConfig {
            max_attempts: 4,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            max_retry_after_s: 60,
        }
    }

    #[test]
    fn backoff_doubles_caps_and_jitters_within_half() {
        let r = retry();
        assert_eq!(backoff(&r, 0, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(&r, 0, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(&r, 2, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(&r, 10, 1.0), Duration::from_millis(1000));
        assert_eq!(backoff(&r, 40, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        use std::time::{Duration, UNIX_EPOCH};
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_450); // Wed, 21 Oct 2015 07:27:30 GMT
        assert_eq!(retry_after_at("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after_at("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after_at("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(retry_after_at("soon", now), None);
        assert_eq!(parse_retry_after(" 5 "), Some(Duration::from_secs(5)));
    }

    #[test]
    fn retry_after_is_honoured_and_auth_stops() {
        let retry_err = |after| SendOutcome::Retry {
            after,
            error: "x".into(),
        };
        let sink = Scripted {
            outcomes: RefCell::new(vec![
                retry_err(Some(Duration::from_secs(7))),
                retry_err(None),
                SendOutcome::Delivered,
            ]),
            calls: RefCell::new(0),
        };
        let mut waits = Vec::new();
        let result = deliver_batch(&sink, &[], &retry(), &mut |d| waits.push(d));
        assert_eq!(result, BatchResult::Delivered { attempts: 3 });
        assert_eq!(waits[0], Duration::from_secs(7));
        // Second retry: 100 ms doubled once, with equal jitter.
        assert!(waits[1] >= Duration::from_millis(100) && waits[1] <= Duration::from_millis(200));

        let sink = Scripted {
            outcomes: RefCell::new(vec![SendOutcome::AuthRefused("no".into())]),
            calls: RefCell::new(0),
        };
        let result = deliver_batch(&sink, &[], &retry(), &mut |_| panic!("no wait"));
        assert!(matches!(result, BatchResult::Stopped { auth: true, .. }));

        let sink = Scripted {
            outcomes: RefCell::new(vec![retry_err(None); 4]),
            calls: RefCell::new(0),
        };
        let result = deliver_batch(&sink, &[], &retry(), &mut |_| {});
        assert!(matches!(result, BatchResult::Stopped { auth: false, .. }));
        assert_eq!(*sink.calls.borrow(), 4);
    }

    #[test]
    fn classification() {
        assert_eq!(
            classify(StatusCode::NO_CONTENT, None, ""),
            SendOutcome::Delivered
        );
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, None, ""),
            SendOutcome::AuthRefused(_)
        ));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, Some("3"), ""),
            SendOutcome::Retry { after: Some(d), .. } if d == Duration::from_secs(3)
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, None, ""),
            SendOutcome::Retry { after: None, .. }
        ));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None, ""),
            SendOutcome::Rejected(_)
        ));
        assert_eq!(escape_tag("a b,c=d"), "a\\ b\\,c\\=d");
    }
}
