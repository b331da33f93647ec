//! Upload sinks and the retry policy they share.
//!
//! A sink sends one batch per request and says what happened ([`SendOutcome`]); the policy in
//! [`deliver_batch`] decides whether to wait and retry (exponential backoff with jitter; the
//! server's `Retry-After` on 429), to stop the sink for this run (credentials refused, a request
//! the server rejects, too many attempts), or to go on. What is not delivered stays pending in the
//! state for the next run.

pub use crate::influx::escape_tag;
use std::collections::BTreeMap;
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
    /// No answer, but the request may have reached the sink and be applied (a timeout, a
    /// connection lost after sending: a hung server applies queued requests when it resumes).
    /// Worth retrying only where a record stored twice does no harm; a verifying sink checks
    /// what it holds instead (see [`deliver_with_retry`]).
    Unknown(String),
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
    /// How to check that what the sink accepted is durable, for a sink whose acceptance does
    /// not mean that (VictoriaMetrics answers before its buffers reach disk). `None`: an
    /// accepted batch is delivered.
    fn verifier(&self) -> Option<&dyn Verify> {
        None
    }
}

/// Checking, by asking the sink, that records it accepted are durable, and re-sending what is
/// missing (see [`verify_and_repair`]).
pub trait Verify {
    /// Make everything the sink has accepted so far durable (VictoriaMetrics: a snapshot, which
    /// writes its in-memory buffers to disk).
    fn persist(&self) -> Result<(), String>;
    /// For each record, the fields the sink does not hold (empty: all of them are there). Call
    /// it after [`Verify::persist`]: then what it finds is on disk.
    fn missing(&self, records: &[&JobRecordFull]) -> Result<Vec<Vec<&'static str>>, String>;
    /// Send only the given fields of each record (those [`Verify::missing`] found missing), so
    /// that what the sink holds already is not stored twice.
    fn send_fields(&self, items: &[(&JobRecordFull, &[&'static str])]) -> SendOutcome;
    /// Records accepted during a run before they are verified (rather than all at its end).
    fn every(&self) -> usize {
        crate::config::DEFAULT_VERIFY_EVERY
    }
}

/// How a batch ended.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchResult {
    /// Delivered after this many attempts.
    Delivered {
        /// Attempts used.
        attempts: u32,
    },
    /// Not delivered; the sink stops for this run. `auth` is true for 401/403; `unknown` when
    /// the last request may still have reached the sink ([`SendOutcome::Unknown`]).
    Stopped {
        /// Whether the last request's fate is unknown.
        unknown: bool,
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

/// Send one batch with retries, sleeping with `sleep` between attempts. `sleep` returns `false`
/// to give up instead (another request to the same sink has stopped it): the batch then stops
/// with the error it had.
pub fn deliver_batch(
    sink: &dyn Sink,
    records: &[&JobRecordFull],
    retry: &RetryConfig,
    sleep: &mut dyn FnMut(Duration) -> bool,
) -> BatchResult {
    let again_if_unknown = sink.verifier().is_none();
    deliver_with_retry(sink.name(), retry, sleep, again_if_unknown, || {
        sink.send(records)
    })
}

/// [`deliver_batch`] for any request: `send` is called until it succeeds, fails for good, or
/// the attempts are used up. An [`SendOutcome::Unknown`] is retried like a failure when
/// `again_if_unknown`; otherwise the batch stops there, since sending it again could store it
/// twice (the caller checks later what the sink holds).
pub fn deliver_with_retry(
    name: &str,
    retry: &RetryConfig,
    sleep: &mut dyn FnMut(Duration) -> bool,
    again_if_unknown: bool,
    mut send: impl FnMut() -> SendOutcome,
) -> BatchResult {
    let mut attempt = 0;
    loop {
        let outcome = send();
        attempt += 1;
        let stop = |error: String, auth: bool, unknown: bool| BatchResult::Stopped {
            error,
            auth,
            unknown,
        };
        let (after, error) = match outcome {
            SendOutcome::Delivered => return BatchResult::Delivered { attempts: attempt },
            SendOutcome::AuthRefused(error) => return stop(error, true, false),
            SendOutcome::Rejected(error) => return stop(error, false, false),
            SendOutcome::Unknown(error) if !again_if_unknown => {
                return stop(
                    format!(
                        "{error} (not sent again: it may have reached the sink; the next check of what the sink holds sends what is missing)"
                    ),
                    false,
                    true,
                )
            }
            SendOutcome::Unknown(error) => (None, error),
            SendOutcome::Retry { after, error } => (after, error),
        };
        if attempt >= retry.max_attempts {
            return stop(
                format!("{error} (gave up after {attempt} attempts this run)"),
                false,
                false,
            );
        }
        let wait = match after {
            Some(after) if after > Duration::from_secs(retry.max_retry_after_s) => {
                return stop(
                    format!(
                        "{error}; the server asked to wait {}s, more than retry.max_retry_after_s",
                        after.as_secs()
                    ),
                    false,
                    false,
                )
            }
            Some(after) => after,
            None => backoff(retry, attempt - 1, jitter_random()),
        };
        tracing::warn!(
            "{name}: {error}; retrying in {:.1}s (attempt {}/{})",
            wait.as_secs_f64(),
            attempt + 1,
            retry.max_attempts
        );
        if !sleep(wait) {
            return stop(
                format!("{error} (not retried: the sink stopped for this run)"),
                false,
                false,
            );
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

/// A request error with its causes (reqwest's own text omits them: "error sending request for
/// url (…)" alone does not say whether the connection was refused or timed out).
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        format!("timed out: {e}")
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
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
        // Not connected: the request never left. Otherwise it may have reached the server.
        Err(e) if e.is_connect() => SendOutcome::Retry {
            after: None,
            error: format!("request failed: {}", describe(&e)),
        },
        Err(e) => SendOutcome::Unknown(format!("request failed: {}", describe(&e))),
    }
}

/// InfluxDB line protocol to VictoriaMetrics' `/write`.
///
/// One line per job: measurement `ergon_job`, tags `cluster`, `job_id`, `user` and, when set,
/// `account`, `partition` and `sluid`; the fields of [`fields`]; the timestamp is the job's end in
/// nanoseconds. VictoriaMetrics names the series `ergon_job_<field>`. The same record sent twice
/// has the same series and timestamp.
///
/// **Durability.** VictoriaMetrics answers a write before the samples reach disk: killed within
/// a few seconds of a write (measured with 1.79: 3 s after a write and a `/internal/force_flush`,
/// every sample was lost; 5 s after, none), it comes back without them. So with `verify` (the
/// default) an accepted batch is only *sent*; [`verify_and_repair`] then makes VictoriaMetrics
/// write its buffers to disk (`/snapshot/create`, then `/snapshot/delete` of that snapshot: a
/// snapshot flushes everything first) and reads the records back (`/api/v1/export`): a record
/// is delivered once every field of it is there.
pub struct VictoriaMetrics {
    client: Client,
    base: String,
    url: String,
    batch_size: usize,
    verify: bool,
    /// `verify_every`.
    verify_every: usize,
    /// Send the per-job lines too (`per_job_series`).
    per_job: bool,
    /// The usage counters, always sent.
    usage: crate::usage::Usage,
}

/// The pseudo-field [`Verify::missing`] names for a record whose group's usage counters
/// VictoriaMetrics does not hold (yet) with it included.
pub const USAGE_FIELD: &str = "usage";

impl VictoriaMetrics {
    /// A sink for the configured server; its usage counters are kept in `state_dir`.
    pub fn new(config: &VictoriaMetricsConfig, state_dir: &Path) -> anyhow::Result<Self> {
        let client = Client::builder()
            .timeout(Duration::from_secs(config.timeout_s))
            .connect_timeout(Duration::from_secs(config.timeout_s.min(10)))
            .build()?;
        let base = config.url.trim_end_matches('/').to_owned();
        Ok(VictoriaMetrics {
            client,
            url: format!("{base}/write"),
            base,
            batch_size: config.batch_size,
            verify: config.verify,
            verify_every: config.verify_every,
            per_job: config.per_job_series,
            usage: crate::usage::Usage::new(state_dir),
        })
    }
}

/// The fields of a record's line (VictoriaMetrics series `ergon_job_<name>`), in order:
/// `energy_j`; `gpu_j`, `cpu_j`, `dram_j` when measured; `avg_w`, `peak_w`, `coverage_min`,
/// `coverage_weighted`, `duration_s`, `nodes`, `gpus`; then, when the manifests state them,
/// `gpu_coverage`, `cpu_coverage`, `dram_coverage` (the job's time-weighted coverage per
/// component), `gpus_unknown_nodes` (when not 0) and `estimate_bound_j`; then, where the GPUs'
/// efficiency was sampled (manifest schema 6), `gpu_idle_j`, `gpu_util_pct`, `gpu_throttle_s`
/// and `xid_events`.
pub fn fields(r: &JobRecordFull) -> Vec<(&'static str, f64)> {
    let mut out = Vec::with_capacity(16);
    out.push(("energy_j", r.energy_j));
    for (field, value) in [("gpu_j", r.gpu_j), ("cpu_j", r.cpu_j), ("dram_j", r.dram_j)] {
        if let Some(v) = value {
            out.push((field, v));
        }
    }
    out.extend([
        ("avg_w", r.avg_w),
        ("peak_w", r.peak_w),
        ("coverage_min", r.coverage_min),
        ("coverage_weighted", r.coverage_weighted),
        ("duration_s", r.duration_s),
        ("nodes", r.nodes.len() as f64),
        ("gpus", r.gpus.len() as f64),
    ]);
    if let Some(c) = r.coverage_components {
        for (field, value) in [
            ("gpu_coverage", c.gpu),
            ("cpu_coverage", c.cpu),
            ("dram_coverage", c.dram),
        ] {
            if let Some(v) = value {
                out.push((field, v));
            }
        }
    }
    if !r.gpus_unknown.is_empty() {
        out.push(("gpus_unknown_nodes", r.gpus_unknown.len() as f64));
    }
    if let Some(b) = r.estimate_bound_j {
        out.push(("estimate_bound_j", b));
    }
    for (field, value) in [
        ("gpu_idle_j", r.gpu_idle_j()),
        ("gpu_util_pct", r.gpu_util_pct()),
        ("gpu_throttle_s", r.gpu_throttle_s()),
        ("xid_events", r.xid_events().map(|n| n as f64)),
        ("wall_j", r.wall_j()),
    ] {
        if let Some(v) = value {
            out.push((field, v));
        }
    }
    out
}

/// One line: the record's tags, the fields `only` names (all of them for `None`), its timestamp.
fn write_line(out: &mut String, r: &JobRecordFull, only: Option<&[&'static str]>) {
    let _ = write!(
        out,
        "ergon_job,cluster={},job_id={},user={}",
        escape_tag(&r.cluster),
        r.job_id,
        escape_tag(&r.user)
    );
    for (tag, value) in [
        ("account", &r.account),
        ("partition", &r.partition),
        ("sluid", &r.sluid),
    ] {
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
            let _ = write!(out, ",{tag}={}", escape_tag(v));
        }
    }
    let mut sep = ' ';
    for (field, value) in fields(r) {
        if only.is_some_and(|o| !o.contains(&field)) {
            continue;
        }
        let _ = write!(out, "{sep}{field}={value}");
        sep = ',';
    }
    let _ = writeln!(out, " {}", r.end_unix_ns);
}

/// The line protocol text for `records`.
pub fn line_protocol(records: &[&JobRecordFull]) -> String {
    let mut out = String::with_capacity(records.len() * 256);
    for r in records {
        write_line(&mut out, r, None);
    }
    out
}

/// The line protocol text for some fields of each record.
pub fn line_protocol_fields(items: &[(&JobRecordFull, &[&'static str])]) -> String {
    let mut out = String::with_capacity(items.len() * 256);
    for (r, only) in items {
        if only.iter().any(|f| *f != USAGE_FIELD) {
            write_line(&mut out, r, Some(only));
        }
    }
    out
}

impl VictoriaMetrics {
    fn post_lines(&self, body: String) -> SendOutcome {
        send_request(
            self.client
                .post(&self.url)
                .header("Content-Type", "text/plain; charset=utf-8")
                .body(body),
        )
    }

    /// A request to VictoriaMetrics' own API: the body of a 2xx answer, or what went wrong.
    fn api(
        &self,
        what: &str,
        request: reqwest::blocking::RequestBuilder,
    ) -> Result<String, String> {
        let response = request
            .send()
            .map_err(|e| format!("{what}: request failed: {}", describe(&e)))?;
        let status = response.status();
        let body = response
            .text()
            .map_err(|e| format!("{what}: reading the answer failed: {}", describe(&e)))?;
        if status.is_success() {
            Ok(body)
        } else {
            let snippet: String = body.chars().take(200).collect();
            Err(format!(
                "{what}: VictoriaMetrics answered {status}: {snippet}"
            ))
        }
    }

    /// The samples of `records` (all of one cluster) VictoriaMetrics holds: by job id and field,
    /// each sample's time (ms) and value.
    fn export(&self, cluster: &str, records: &[&JobRecordFull]) -> Result<Held, String> {
        let ms = |r: &&JobRecordFull| (r.end_unix_ns / 1_000_000) as i64;
        let start = records.iter().map(ms).min().unwrap_or(0) - 1;
        let end = records.iter().map(ms).max().unwrap_or(0) + 1;
        let mut ids: Vec<String> = records.iter().map(|r| r.job_id.to_string()).collect();
        ids.sort();
        ids.dedup();
        let escaped = cluster.replace('\\', "\\\\").replace('"', "\\\"");
        let selector = format!(
            "{{__name__=~\"ergon_job_.+\",cluster=\"{escaped}\",job_id=~\"{}\"}}",
            ids.join("|")
        );
        let seconds = |t: i64| format!("{}.{:03}", t.div_euclid(1000), t.rem_euclid(1000));
        // CSV with only the four columns compared: VictoriaMetrics renders and ergon parses far
        // less than the JSON export's full label sets (BENCHMARKS.md, accounting ratio).
        let text = self.api(
            "reading the records back (/api/v1/export/csv)",
            self.client
                .post(format!("{}/api/v1/export/csv", self.base))
                .form(&[
                    ("format", "__name__,job_id,__value__,__timestamp__:unix_ms"),
                    ("match[]", selector.as_str()),
                    ("start", &seconds(start)),
                    ("end", &seconds(end)),
                ]),
        )?;
        let mut held = Held::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let bad = || format!("/api/v1/export/csv answered a line ergon cannot read: {line:?}");
            let mut cols = line.split(',');
            let (Some(name), Some(job), Some(value), Some(time), None) = (
                cols.next(),
                cols.next(),
                cols.next(),
                cols.next(),
                cols.next(),
            ) else {
                return Err(bad());
            };
            let Some(name) = name.strip_prefix("ergon_job_") else {
                continue;
            };
            let (Ok(job), Ok(value), Ok(time)) = (
                job.parse::<u32>(),
                value.parse::<f64>(),
                time.parse::<i64>(),
            ) else {
                return Err(bad());
            };
            held.entry((job, name.to_owned()))
                .or_default()
                .push((time, value));
        }
        Ok(held)
    }
}

/// Samples read back from VictoriaMetrics: by job id and field, each sample's time (ms) and value.
type Held = BTreeMap<(u32, String), Vec<(i64, f64)>>;

/// Whether a value read back from VictoriaMetrics is the one written (it stores a float as a
/// decimal, which can differ in the last digits).
fn same_value(written: f64, read: f64) -> bool {
    (written - read).abs() <= 1e-9 * written.abs().max(read.abs()).max(1.0)
}

/// Records per `/api/v1/export` request when verifying, and the longest span of job end times
/// one request covers (VictoriaMetrics limits an export's time range, 30 days by default). The
/// cost of a verification is mostly per request (BENCHMARKS.md: 200 records per request made a
/// 30,000-record run 3.5× slower than 5,000).
const VERIFY_CHUNK: usize = 5000;
const VERIFY_SPAN_NS: u64 = 24 * 3600 * 1_000_000_000;

impl Verify for VictoriaMetrics {
    fn every(&self) -> usize {
        self.verify_every
    }

    fn persist(&self) -> Result<(), String> {
        let body = self.api(
            "writing VictoriaMetrics' buffers to disk (/snapshot/create)",
            self.client.post(format!("{}/snapshot/create", self.base)),
        )?;
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let Some(name) = answer["snapshot"]
            .as_str()
            .filter(|_| answer["status"] == "ok")
        else {
            return Err(format!(
                "/snapshot/create did not create a snapshot: {}",
                body.chars().take(200).collect::<String>()
            ));
        };
        // The snapshot was only the means to flush; keeping it would keep old data on disk.
        if let Err(e) = self.api(
            "removing the snapshot ergon made (/snapshot/delete)",
            self.client
                .post(format!("{}/snapshot/delete", self.base))
                .form(&[("snapshot", name)]),
        ) {
            tracing::warn!(
                "victoria_metrics: {e}; remove the snapshot {name} by hand (it holds disk space)"
            );
        }
        Ok(())
    }

    fn missing(&self, records: &[&JobRecordFull]) -> Result<Vec<Vec<&'static str>>, String> {
        let mut out = self.usage_missing(records)?;
        if !self.per_job {
            return Ok(out);
        }
        let mut order: Vec<usize> = (0..records.len()).collect();
        order.sort_by(|&a, &b| {
            (&records[a].cluster, records[a].end_unix_ns)
                .cmp(&(&records[b].cluster, records[b].end_unix_ns))
        });
        let mut start = 0;
        while start < order.len() {
            let first = records[order[start]];
            let mut end = start + 1;
            while end < order.len()
                && end - start < VERIFY_CHUNK
                && records[order[end]].cluster == first.cluster
                && records[order[end]].end_unix_ns - first.end_unix_ns <= VERIFY_SPAN_NS
            {
                end += 1;
            }
            let chunk: Vec<&JobRecordFull> =
                order[start..end].iter().map(|&i| records[i]).collect();
            let held = self.export(&first.cluster, &chunk)?;
            for &i in &order[start..end] {
                let r = records[i];
                let at = (r.end_unix_ns / 1_000_000) as i64;
                for (field, value) in fields(r) {
                    let there = held
                        .get(&(r.job_id, field.to_owned()))
                        .is_some_and(|s| s.iter().any(|&(t, x)| t == at && same_value(value, x)));
                    if !there {
                        out[i].push(field);
                    }
                }
            }
            start = end;
        }
        Ok(out)
    }

    fn send_fields(&self, items: &[(&JobRecordFull, &[&'static str])]) -> SendOutcome {
        let usage: Vec<&JobRecordFull> = items
            .iter()
            .filter(|(_, f)| f.contains(&USAGE_FIELD))
            .map(|(r, _)| *r)
            .collect();
        // Records never added (sent before a crash that lost the counters' file, or never
        // sent) are added now; the others' groups are sent again as they stand.
        let mut body = match self.usage.add(&usage) {
            Ok(text) => text,
            Err(e) => return SendOutcome::Rejected(e),
        };
        body += &line_protocol_fields(items);
        if body.is_empty() {
            return SendOutcome::Delivered;
        }
        self.post_lines(body)
    }
}

impl VictoriaMetrics {
    /// For each record, `[USAGE_FIELD]` when VictoriaMetrics does not hold its group's counters
    /// with it included (see [`crate::usage`]), else nothing.
    fn usage_missing(&self, records: &[&JobRecordFull]) -> Result<Vec<Vec<&'static str>>, String> {
        let included = self.usage.included(records)?;
        let mut out = vec![Vec::new(); records.len()];
        let mut by_cluster: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, inc) in included.iter().enumerate() {
            match inc {
                None => out[i].push(USAGE_FIELD),
                Some(_) => by_cluster
                    .entry(records[i].cluster.as_str())
                    .or_default()
                    .push(i),
            }
        }
        for (cluster, at) in by_cluster {
            let start = at
                .iter()
                .filter_map(|&i| included[i].as_ref().map(|x| x.at_ms))
                .min()
                .unwrap_or(0);
            let held = self.export_usage(cluster, start)?;
            for i in at {
                let Some(inc) = &included[i] else { continue };
                let g = &inc.group;
                let ok = crate::usage::COUNTERS
                    .iter()
                    .zip(inc.after)
                    .all(|(name, after)| {
                        held.get(&(
                            g.partition.clone(),
                            g.account.clone(),
                            g.user.clone(),
                            (*name).to_owned(),
                        ))
                        .is_some_and(|samples| {
                            samples.iter().any(|&(t, v)| {
                                t >= inc.at_ms && (v >= after || same_value(after, v))
                            })
                        })
                    });
                if !ok {
                    out[i].push(USAGE_FIELD);
                }
            }
        }
        Ok(out)
    }

    /// The usage samples of `cluster` from `start_ms` on: by (partition, account, user,
    /// counter), each sample's time (ms) and value.
    fn export_usage(&self, cluster: &str, start_ms: i64) -> Result<UsageHeld, String> {
        let escaped = cluster.replace('\\', "\\\\").replace('"', "\\\"");
        let selector = format!("{{__name__=~\"ergon_usage_.+\",cluster=\"{escaped}\"}}");
        let seconds = |t: i64| format!("{}.{:03}", t.div_euclid(1000), t.rem_euclid(1000));
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
            + 60_000;
        let text = self.api(
            "reading the usage counters back (/api/v1/export)",
            self.client
                .post(format!("{}/api/v1/export", self.base))
                .form(&[
                    ("match[]", selector.as_str()),
                    ("start", &seconds(start_ms - 1)),
                    ("end", &seconds(end)),
                ]),
        )?;
        let mut held = UsageHeld::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| format!("/api/v1/export answered a line that is not JSON: {e}"))?;
            let metric = &v["metric"];
            let Some(name) = metric["__name__"]
                .as_str()
                .and_then(|n| n.strip_prefix("ergon_usage_"))
            else {
                continue;
            };
            let label = |l: &str| metric[l].as_str().unwrap_or_default().to_owned();
            let values = v["values"].as_array().cloned().unwrap_or_default();
            let times = v["timestamps"].as_array().cloned().unwrap_or_default();
            let samples = held
                .entry((
                    label("partition"),
                    label("account"),
                    label("user"),
                    name.to_owned(),
                ))
                .or_default();
            for (t, x) in times.iter().zip(&values) {
                if let (Some(t), Some(x)) = (t.as_i64(), x.as_f64()) {
                    samples.push((t, x));
                }
            }
        }
        Ok(held)
    }
}

/// Usage samples read back: by (partition, account, user, counter), time (ms) and value.
type UsageHeld = BTreeMap<(String, String, String, String), Vec<(i64, f64)>>;

impl Sink for VictoriaMetrics {
    fn name(&self) -> &str {
        "victoria_metrics"
    }
    fn batch_size(&self) -> usize {
        self.batch_size
    }
    fn send(&self, records: &[&JobRecordFull]) -> SendOutcome {
        // The counters first: a record is in them (durably, in the state directory) before any
        // line that carries it leaves; sending again adds nothing.
        // The records' groups as they now stand (also those whose counters held them already:
        // an earlier run may have added them and then failed to send).
        let mut body = match self.usage.add(records) {
            Ok(text) => text,
            Err(e) => return SendOutcome::Rejected(e),
        };
        if self.per_job {
            body += &line_protocol(records);
        }
        if body.is_empty() {
            return SendOutcome::Delivered;
        }
        self.post_lines(body)
    }
    fn verifier(&self) -> Option<&dyn Verify> {
        self.verify.then_some(self as &dyn Verify)
    }
}

/// What [`verify_and_repair`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Verified {
    /// Indices of the records the sink holds durably (delivered).
    pub present: Vec<usize>,
    /// Indices of the records it does not (yet): still to deliver.
    pub missing: Vec<usize>,
    /// Why some are missing, when they are.
    pub error: Option<String>,
    /// Records (indices into the input) whose missing fields were sent again.
    pub resent: usize,
}

/// Rounds of re-sending what a verification found missing, per run.
pub const REPAIR_ROUNDS: u32 = 2;

/// Make what `sink` accepted durable, read `records` back, and send again what of them is
/// missing (only the missing fields), up to [`REPAIR_ROUNDS`] times, until every record is
/// there. A record that was never sent is simply missing, so this also delivers records whose
/// fate is unknown (pending from an earlier run, which may have reached the sink before a crash)
/// without storing anything twice.
pub fn verify_and_repair(
    sink: &dyn Sink,
    verifier: &dyn Verify,
    records: &[&JobRecordFull],
    retry: &RetryConfig,
    sleep: &mut dyn FnMut(Duration) -> bool,
) -> Verified {
    let mut result = Verified::default();
    let mut open: Vec<usize> = (0..records.len()).collect();
    let mut round = 0;
    while !open.is_empty() {
        if let Err(e) = verifier.persist() {
            result.error = Some(e);
            break;
        }
        let asked: Vec<&JobRecordFull> = open.iter().map(|&i| records[i]).collect();
        let missing = match verifier.missing(&asked) {
            Ok(m) => m,
            Err(e) => {
                result.error = Some(e);
                break;
            }
        };
        tracing::debug!(
            "{}: verification round {round}: {} records asked, {} with fields missing",
            sink.name(),
            asked.len(),
            missing.iter().filter(|m| !m.is_empty()).count()
        );
        let mut still: Vec<(usize, Vec<&'static str>)> = Vec::new();
        for (k, fields) in missing.into_iter().enumerate() {
            if fields.is_empty() {
                result.present.push(open[k]);
            } else {
                still.push((open[k], fields));
            }
        }
        if !still.is_empty() && round == 0 {
            // Before anything is sent again, look again a few times: a server that has just
            // stored data may not show it at once, and what is sent again while it is in fact
            // there is stored twice.
            match look_again(verifier, records, still, sleep) {
                Ok((found, rest)) => {
                    result.present.extend(found);
                    still = rest;
                }
                Err((e, rest)) => {
                    result.error = Some(e);
                    open = rest.iter().map(|(i, _)| *i).collect();
                    break;
                }
            }
        }
        open = still.iter().map(|(i, _)| *i).collect();
        if open.is_empty() {
            break;
        }
        if round == REPAIR_ROUNDS {
            result.error = Some(format!(
                "{} records are still not all there after {REPAIR_ROUNDS} rounds of sending their missing fields again",
                open.len()
            ));
            break;
        }
        round += 1;
        for chunk in still.chunks(sink.batch_size().max(1)) {
            let items: Vec<(&JobRecordFull, &[&'static str])> = chunk
                .iter()
                .map(|(i, f)| (records[*i], f.as_slice()))
                .collect();
            match deliver_with_retry(sink.name(), retry, sleep, false, || {
                verifier.send_fields(&items)
            }) {
                BatchResult::Delivered { .. } => result.resent += chunk.len(),
                BatchResult::Stopped { error, .. } => {
                    result.error = Some(error);
                    result.missing = open;
                    return result;
                }
            }
        }
    }
    result.missing = open;
    result
}

/// Waits before [`verify_and_repair`] looks again at what it found missing, before sending
/// any of it again (3.5 s in all, only when something is missing).
pub const LOOK_AGAIN: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
];

/// Records (indices into `records`) with their missing fields.
type Missing = Vec<(usize, Vec<&'static str>)>;

/// Look again, after each wait of [`LOOK_AGAIN`], at the records of `still`: those found
/// (indices into `records`) and those still missing; or why looking failed, with what is still
/// missing.
fn look_again(
    verifier: &dyn Verify,
    records: &[&JobRecordFull],
    mut still: Missing,
    sleep: &mut dyn FnMut(Duration) -> bool,
) -> Result<(Vec<usize>, Missing), (String, Missing)> {
    let mut found = Vec::new();
    for wait in LOOK_AGAIN {
        if still.is_empty() || !sleep(wait) {
            break;
        }
        if let Err(e) = verifier.persist() {
            return Err((e, still));
        }
        let asked: Vec<&JobRecordFull> = still.iter().map(|(i, _)| records[*i]).collect();
        let missing = match verifier.missing(&asked) {
            Ok(m) => m,
            Err(e) => return Err((e, still)),
        };
        let mut rest = Vec::new();
        for ((i, _), fields) in still.into_iter().zip(missing) {
            if fields.is_empty() {
                found.push(i);
            } else {
                rest.push((i, fields));
            }
        }
        still = rest;
    }
    Ok((found, still))
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
        let url = reqwest::Url::parse(&config.url)
            .with_context(|| format!("http.url {:?} is not a URL", config.url))?;
        match url.scheme() {
            "https" => {}
            "http" if config.token_file.is_none() => {}
            "http" if config.allow_token_over_plain_http => tracing::warn!(
                "http: sending the bearer token over plain http:// to {} (http.allow_token_over_plain_http = true): anyone on the path can read it",
                config.url
            ),
            "http" => anyhow::bail!(
                "http.url {} is plain http:// and http.token_file is set: the bearer token would cross the network unencrypted. Use an https:// URL, or set http.allow_token_over_plain_http = true if the path is trusted (e.g. loopback)",
                config.url
            ),
            other => anyhow::bail!(
                "http.url {} has the scheme {other:?}; use https:// (or http://)",
                config.url
            ),
        }
        let mut builder = Client::builder()
            .use_rustls_tls()
            // A redirect is not followed: it could lead the token elsewhere (another host, or
            // plain http). A 3xx stops the sink with its status; point url at the final address.
            .redirect(reqwest::redirect::Policy::none())
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

    /// A sink whose stored records become visible only at its `shows_at`-th look.
    struct Late {
        looks: RefCell<u32>,
        shows_at: u32,
        resent: RefCell<usize>,
    }

    impl Sink for Late {
        fn name(&self) -> &str {
            "late"
        }
        fn batch_size(&self) -> usize {
            10
        }
        fn send(&self, _: &[&JobRecordFull]) -> SendOutcome {
            SendOutcome::Delivered
        }
    }

    impl Verify for Late {
        fn persist(&self) -> Result<(), String> {
            Ok(())
        }
        fn missing(&self, records: &[&JobRecordFull]) -> Result<Vec<Vec<&'static str>>, String> {
            *self.looks.borrow_mut() += 1;
            let shown = *self.looks.borrow() >= self.shows_at;
            Ok(records
                .iter()
                .map(|_| if shown { vec![] } else { vec!["energy_j"] })
                .collect())
        }
        fn send_fields(&self, items: &[(&JobRecordFull, &[&'static str])]) -> SendOutcome {
            *self.resent.borrow_mut() += items.len();
            SendOutcome::Delivered
        }
    }

    fn records(n: u32) -> Vec<JobRecordFull> {
        (1..=n)
            .map(|j| {
                crate::collect::combine(&[ergon_protocol::testing::ManifestBuilder::new(
                    "c", j, "n1",
                )
                .build()])
            })
            .collect()
    }

    /// Records a server shows only a moment after it stored them are found by looking again,
    /// not sent a second time (which would store them twice); records that stay missing are.
    #[test]
    fn a_record_the_server_shows_late_is_looked_for_again_not_sent_twice() {
        let owned = records(3);
        let recs: Vec<&JobRecordFull> = owned.iter().collect();
        for (shows_at, resent, waits) in [(3, 0, 2), (u32::MAX, 3 * REPAIR_ROUNDS as usize, 3)] {
            let late = Late {
                looks: RefCell::new(0),
                shows_at,
                resent: RefCell::new(0),
            };
            let mut slept = Vec::new();
            let found = verify_and_repair(&late, &late, &recs, &retry(), &mut |d| {
                slept.push(d);
                true
            });
            assert_eq!(*late.resent.borrow(), resent, "shows at look {shows_at}");
            assert_eq!(slept, LOOK_AGAIN[..waits].to_vec());
            if resent == 0 {
                assert_eq!(found.present, vec![0, 1, 2]);
                assert!(found.missing.is_empty() && found.error.is_none());
            } else {
                assert_eq!(found.missing, vec![0, 1, 2]);
                assert!(found.error.is_some());
            }
        }
    }

    #[test]
    fn a_job_line_carries_the_gpu_efficiency_fields_only_where_sampled() {
        let eff = ergon_protocol::GpuEfficiency {
            sampled_s: 10.0,
            partial: false,
            sm_util_avg_pct: Some(2.0),
            idle: Some(true),
            idle_threshold_pct: 5.0,
            memory_used_max_bytes: None,
            temperature_max_c: None,
            sm_clock_avg_mhz: None,
            mem_clock_avg_mhz: None,
            throttle_s: ergon_protocol::ThrottleSeconds {
                power_cap: Some(1.5),
                sw_thermal: None,
                hw_thermal: None,
                hw_power_brake: None,
            },
            ecc_corrected: None,
            ecc_uncorrected: None,
            xid_count: None,
            xids: None,
        };
        let plain = ergon_protocol::testing::ManifestBuilder::new("c", 1, "n1")
            .gpu(Some(500.0))
            .build();
        let with = ergon_protocol::testing::ManifestBuilder::new("c", 1, "n1")
            .gpu(Some(500.0))
            .gpu_efficiency(eff)
            .build();
        let r = crate::collect::combine(&[with]);
        let f = fields(&r);
        for (k, v) in [
            ("gpu_idle_j", 500.0),
            ("gpu_util_pct", 2.0),
            ("gpu_throttle_s", 1.5),
        ] {
            assert!(f.contains(&(k, v)), "{k}: {f:?}");
        }
        assert!(
            !f.iter().any(|(k, _)| *k == "xid_events"),
            "not reported: {f:?}"
        );
        let f = fields(&crate::collect::combine(&[plain]));
        assert!(!f
            .iter()
            .any(|(k, _)| k.starts_with("gpu_idle") || k.starts_with("gpu_util")));
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
        let result = deliver_batch(&sink, &[], &retry(), &mut |d| {
            waits.push(d);
            true
        });
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
        let result = deliver_batch(&sink, &[], &retry(), &mut |_| true);
        assert!(matches!(result, BatchResult::Stopped { auth: false, .. }));
        assert_eq!(*sink.calls.borrow(), 4);
    }

    #[test]
    fn an_unanswered_request_is_sent_again_only_where_duplicates_do_no_harm() {
        let unknown = || SendOutcome::Unknown("timed out".into());
        let mut calls = 0;
        let result = deliver_with_retry("vm", &retry(), &mut |_| true, false, || {
            calls += 1;
            unknown()
        });
        assert!(matches!(
            result,
            BatchResult::Stopped {
                unknown: true,
                auth: false,
                ..
            }
        ));
        assert_eq!(calls, 1, "not sent again");
        let mut calls = 0;
        let result = deliver_with_retry("http", &retry(), &mut |_| true, true, || {
            calls += 1;
            if calls < 3 {
                unknown()
            } else {
                SendOutcome::Delivered
            }
        });
        assert_eq!(result, BatchResult::Delivered { attempts: 3 });
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
