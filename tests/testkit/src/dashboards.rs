//! The Grafana dashboards shipped in `dashboards/`, for the tests that check them: loading with
//! the static checks ([`load_all`]: valid JSON, unique panel ids, the datasource a template
//! variable), every panel's targets (rows' nested panels included), the metric names an
//! expression uses ([`metric_names`]), and [`evaluate`]: every target of a dashboard run
//! through a real backend's Prometheus HTTP API (Prometheus scraping ergond for the node and job
//! dashboards, VictoriaMetrics holding `ergon run`'s uploads for the site dashboard), each
//! awaited until it returns data, each metric checked against what ergon exports.
//!
//! Which backend a dashboard is for is in its own tags (`ergond` or `accounting`), so a new
//! panel, or a new dashboard, is a JSON-only change these tests pick up.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The `dashboards/` directory of the source tree.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dashboards")
}

/// What a dashboard's queries read, from its tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Tag `ergond`: a Prometheus scraping ergond's `/metrics`.
    Ergond,
    /// Tag `accounting`: a VictoriaMetrics (or Prometheus) holding `ergon run`'s uploads.
    Accounting,
}

/// One dashboard file, parsed and checked.
#[derive(Debug)]
pub struct Dashboard {
    /// The file name (`node.json`).
    pub file: String,
    /// Its JSON.
    pub json: Value,
    /// What its queries read.
    pub source: Source,
}

/// One query of a panel.
#[derive(Clone, Debug)]
pub struct Target {
    /// The panel's title, for messages.
    pub panel: String,
    /// The target's `refId`.
    pub ref_id: String,
    /// The PromQL/MetricsQL expression, variables not substituted.
    pub expr: String,
    /// An instant query (`"instant": true`), else a range query.
    pub instant: bool,
}

/// A template variable.
#[derive(Clone, Debug)]
pub enum Variable {
    /// The datasource picker (`${datasource}`).
    Datasource,
    /// `label_values(metric, label)`.
    LabelValues {
        /// The variable's name.
        name: String,
        /// The metric whose label values it offers.
        metric: String,
        /// The label.
        label: String,
        /// What "All" stands for (`allValue`), when the variable offers it.
        all_value: Option<String>,
    },
    /// An interval or custom variable: its current value.
    Fixed {
        /// The variable's name.
        name: String,
        /// Its current (default) value.
        value: String,
    },
}

/// Grafana's global variables and what the tests put in their place.
pub const GLOBALS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__range_s", "3600"),
    ("__range", "1h"),
];

/// Loads every `*.json` in [`dir`] and checks it; panics with the file and the reason when a
/// check fails. Checks: valid JSON; a title, a `uid` unique among the dashboards, a
/// `schemaVersion`; tags `ergon` and exactly one of `ergond`/`accounting`; the first template
/// variable is `datasource` of type `datasource` for `prometheus`, and every panel and target
/// uses it (`${datasource}`); panel ids unique (rows' nested panels included); every panel but
/// rows and text has at least one target, each an expression that is an instant or a range
/// query; every `$variable` an expression uses is a template variable or one of Grafana's
/// [`GLOBALS`]; no `__name__` matchers (the metric names must be readable).
pub fn load_all() -> Vec<Dashboard> {
    let dir = dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
    let mut uids = BTreeSet::new();
    let out: Vec<Dashboard> = files
        .iter()
        .map(|path| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(path).unwrap();
            let d = parse(&file, &text).unwrap_or_else(|e| panic!("dashboards/{file}: {e}"));
            let uid = d.json["uid"].as_str().unwrap().to_string();
            assert!(
                uids.insert(uid.clone()),
                "dashboards/{file}: uid {uid:?} used twice"
            );
            d
        })
        .collect();
    out
}

/// Parses and checks one dashboard (the checks of [`load_all`] but the uid's uniqueness).
pub fn parse(file: &str, text: &str) -> Result<Dashboard, String> {
    let json: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    for key in ["title", "uid"] {
        if json[key].as_str().is_none_or(|s| s.is_empty()) {
            return Err(format!("no {key}"));
        }
    }
    if json["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
        return Err("schemaVersion missing or below 36".into());
    }
    let tags: Vec<&str> = json["tags"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !tags.contains(&"ergon") {
        return Err("no tag \"ergon\"".into());
    }
    let source = match (tags.contains(&"ergond"), tags.contains(&"accounting")) {
        (true, false) => Source::Ergond,
        (false, true) => Source::Accounting,
        _ => return Err("exactly one of the tags \"ergond\" and \"accounting\" needed".into()),
    };
    let d = Dashboard {
        file: file.to_string(),
        json,
        source,
    };
    let vars = d.variables()?;
    if !matches!(vars.first(), Some(Variable::Datasource)) {
        return Err(
            "the first template variable must be `datasource` (type datasource, prometheus)".into(),
        );
    }
    let mut names: BTreeSet<String> = vars.iter().filter_map(|v| v.name()).collect();
    names.insert("datasource".into());
    let mut ids = BTreeSet::new();
    for p in d.panels() {
        let title = p["title"].as_str().unwrap_or("").to_string();
        let id = p["id"]
            .as_u64()
            .ok_or_else(|| format!("panel {title:?}: no integer id"))?;
        if !ids.insert(id) {
            return Err(format!("panel id {id} used twice ({title:?})"));
        }
        let kind = p["type"].as_str().unwrap_or("");
        if kind == "row" || kind == "text" {
            continue;
        }
        if title.is_empty() {
            return Err(format!("panel {id}: no title"));
        }
        if !is_datasource_var(&p["datasource"]) {
            return Err(format!(
                "panel {title:?}: datasource must be {{\"type\": \"prometheus\", \"uid\": \"${{datasource}}\"}}, is {}",
                p["datasource"]
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            return Err(format!("panel {title:?}: no targets"));
        }
        for t in &targets {
            let r = t["refId"].as_str().unwrap_or("?");
            if !is_datasource_var(&t["datasource"]) {
                return Err(format!(
                    "panel {title:?} target {r}: datasource must be the variable, is {}",
                    t["datasource"]
                ));
            }
            let expr = t["expr"].as_str().unwrap_or("");
            if expr.trim().is_empty() {
                return Err(format!("panel {title:?} target {r}: no expr"));
            }
            if t["instant"].as_bool() == t["range"].as_bool() {
                return Err(format!(
                    "panel {title:?} target {r}: exactly one of \"instant\" and \"range\" must be true"
                ));
            }
            if expr.contains("__name__") {
                return Err(format!(
                    "panel {title:?} target {r}: a __name__ matcher hides the metric's name"
                ));
            }
            for v in variables_used(expr) {
                if !names.contains(&v) && !GLOBALS.iter().any(|(g, _)| *g == v) {
                    return Err(format!(
                        "panel {title:?} target {r}: ${v} is no template variable"
                    ));
                }
            }
        }
    }
    if ids.is_empty() {
        return Err("no panels".into());
    }
    Ok(d)
}

fn is_datasource_var(ds: &Value) -> bool {
    ds["type"] == "prometheus" && ds["uid"] == "${datasource}"
}

/// `$name` and `${name}` in `expr` (not `$1`, a regex group).
fn variables_used(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let braced = rest.starts_with('{');
        let s = if braced { &rest[1..] } else { rest };
        let n = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        let name = &s[..n];
        if name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            out.push(name.to_string());
        }
    }
    out
}

impl Variable {
    /// The variable's name (`None` for the datasource).
    pub fn name(&self) -> Option<String> {
        match self {
            Variable::Datasource => None,
            Variable::LabelValues { name, .. } | Variable::Fixed { name, .. } => Some(name.clone()),
        }
    }
}

impl Dashboard {
    /// Every panel, rows' nested panels included, in order.
    pub fn panels(&self) -> Vec<&Value> {
        fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
            for p in list.as_array().into_iter().flatten() {
                out.push(p);
                walk(&p["panels"], out);
            }
        }
        let mut out = Vec::new();
        walk(&self.json["panels"], &mut out);
        out
    }

    /// Every target of every panel.
    pub fn targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        for p in self.panels() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(Target {
                    panel: p["title"].as_str().unwrap_or("").to_string(),
                    ref_id: t["refId"].as_str().unwrap_or("").to_string(),
                    expr: t["expr"].as_str().unwrap_or("").to_string(),
                    instant: t["instant"].as_bool().unwrap_or(false),
                });
            }
        }
        out
    }

    /// The template variables, in order.
    pub fn variables(&self) -> Result<Vec<Variable>, String> {
        let mut out = Vec::new();
        for v in self.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = v["name"].as_str().unwrap_or("").to_string();
            let query = match &v["query"] {
                Value::String(s) => s.clone(),
                q => q["query"].as_str().unwrap_or("").to_string(),
            };
            out.push(match v["type"].as_str().unwrap_or("") {
                "datasource" if name == "datasource" && query == "prometheus" => {
                    Variable::Datasource
                }
                "query" => {
                    if !is_datasource_var(&v["datasource"]) {
                        return Err(format!("variable {name}: datasource must be the variable"));
                    }
                    let args = query
                        .trim()
                        .strip_prefix("label_values(")
                        .and_then(|a| a.strip_suffix(')'))
                        .ok_or_else(|| {
                            format!("variable {name}: label_values(metric, label) expected")
                        })?;
                    let (metric, label) = args
                        .rsplit_once(',')
                        .ok_or_else(|| format!("variable {name}: label_values needs a metric"))?;
                    Variable::LabelValues {
                        name,
                        metric: metric.trim().to_string(),
                        label: label.trim().to_string(),
                        all_value: (v["includeAll"] == true)
                            .then(|| v["allValue"].as_str().unwrap_or("").to_string()),
                    }
                }
                "interval" | "custom" | "constant" => Variable::Fixed {
                    value: v["current"]["value"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| query.split(',').next().unwrap_or("").to_string()),
                    name,
                },
                t => {
                    return Err(format!(
                        "variable {name}: type {t:?} not handled by the test"
                    ))
                }
            });
        }
        Ok(out)
    }
}

/// The metric names an expression selects (PromQL, and the MetricsQL it shares): identifiers
/// that are neither functions (followed by `(`), keywords, label lists (`by (…)`), nor inside
/// label matchers, ranges or strings.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "keep_metric_names",
        "if",
        "ifnot",
        "default",
        "atan2",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // The end of a string starting at `i` (a quote), past its closing quote.
    let skip_string = |mut i: usize| {
        let q = b[i];
        i += 1;
        while i < b.len() && b[i] != q {
            if b[i] == b'\\' && q != b'`' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    };
    // Past the bracket closing the one at `i`, strings inside skipped.
    let skip_group = |mut i: usize, open: u8, close: u8| {
        let mut depth = 0;
        while i < b.len() {
            match b[i] {
                b'"' | b'\'' | b'`' => {
                    i = skip_string(i);
                    continue;
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = skip_string(i),
            b'{' => i = skip_group(i, b'{', b'}'),
            b'[' => i = skip_group(i, b'[', b']'),
            b'0'..=b'9' | b'.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                // `sum by (l) (…)`: an aggregation with its label list first.
                let grouping = ["by", "without"].iter().any(|k| {
                    expr[j..].starts_with(k)
                        && !expr[j + k.len()..].starts_with(|c: char| {
                            c.is_ascii_alphanumeric() || c == '_' || c == ':'
                        })
                });
                let paren = (j < b.len() && b[j] == b'(') || grouping;
                let lower = word.to_ascii_lowercase();
                if LABEL_LISTS.contains(&lower.as_str()) {
                    if paren {
                        i = skip_group(j, b'(', b')');
                    }
                } else if !paren && !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The metric names of a Prometheus text exposition (each sample's name, so a summary's
/// `_sum` and `_count` too).
pub fn exposition_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Replaces the template variables (`values`) and Grafana's [`GLOBALS`] in `expr`; longer names
/// first, so `$__range_s` is not read as `$__range`.
pub fn substitute(expr: &str, values: &BTreeMap<String, String>) -> String {
    let mut all: Vec<(String, String)> = values
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain(GLOBALS.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    all.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    let mut out = expr.to_string();
    for (k, v) in &all {
        out = out.replace(&format!("${{{k}}}"), v);
        out = out.replace(&format!("${k}"), v);
    }
    out
}

/// A Prometheus HTTP query API (Prometheus itself, or VictoriaMetrics).
#[derive(Clone, Copy, Debug)]
pub struct Api {
    /// Its address.
    pub addr: SocketAddr,
}

/// Percent-encode everything but unreserved characters (RFC 3986).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` over HTTP/1.0 (no chunked answer): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

impl Api {
    /// `data` of a successful answer to `path`; `Ok(None)` while the backend cannot be reached;
    /// `Err` for an answer that refuses the query (a syntax error is no reason to wait).
    fn data(&self, path: &str) -> Result<Option<Value>, String> {
        match http_get(self.addr, path) {
            Err(_) => Ok(None),
            Ok((200, body)) => {
                let v: Value = serde_json::from_str(&body)
                    .map_err(|e| format!("{path}: not JSON ({e}): {body}"))?;
                if v["status"] != "success" {
                    return Err(format!("{path}: {v}"));
                }
                Ok(Some(v["data"].clone()))
            }
            Ok((503, _)) => Ok(None),
            Ok((status, body)) => Err(format!("{path}: HTTP {status}: {body}")),
        }
    }

    /// The series an expression returns now: an instant query at now, or a range query over
    /// the last 5 minutes with a 2 s step.
    pub fn eval(&self, expr: &str, instant: bool) -> Result<Vec<Value>, String> {
        let now = now_s();
        let path = if instant {
            format!("/api/v1/query?query={}&time={now:.3}", url_encode(expr))
        } else {
            format!(
                "/api/v1/query_range?query={}&start={:.3}&end={now:.3}&step=2",
                url_encode(expr),
                now - 300.0
            )
        };
        Ok(self
            .data(&path)?
            .and_then(|d| d["result"].as_array().cloned())
            .unwrap_or_default())
    }

    /// The values of `label` on the series of `metric` (what Grafana's `label_values` offers).
    pub fn label_values(&self, label: &str, metric: &str) -> Result<Vec<String>, String> {
        let now = now_s();
        let path = format!(
            "/api/v1/label/{label}/values?match[]={}&start={:.0}&end={:.0}",
            url_encode(metric),
            now - 3600.0,
            now + 60.0
        );
        Ok(self
            .data(&path)?
            .and_then(|d| {
                d.as_array().map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default())
    }
}

/// Polls `cond` every 200 ms until it returns `Some`; panics with `what` at `deadline`.
pub fn await_some<T>(what: &str, deadline: Instant, mut cond: impl FnMut() -> Option<T>) -> T {
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Evaluates every target of `d` against `api` and panics unless each returns data before
/// `deadline`, and unless every metric each one uses is in `exported` (what ergon exports:
/// ergond's `/metrics`, or the series the uploads made).
///
/// Variables: a `label_values(metric, label)` variable's metric must be exported too and its
/// values non-empty; its value is `chosen[name]` (which must be among them, or be the
/// variable's "All" value) or else the first.
/// Interval and custom variables take their current value; Grafana's globals [`GLOBALS`].
/// Returns every target with its expression as evaluated (substituted).
pub fn evaluate(
    d: &Dashboard,
    api: Api,
    chosen: &BTreeMap<&str, &str>,
    exported: &BTreeSet<String>,
    deadline: Instant,
) -> Vec<(Target, String)> {
    let file = &d.file;
    let mut values = BTreeMap::new();
    for v in d.variables().unwrap() {
        match v {
            Variable::Datasource => {}
            Variable::Fixed { name, value } => {
                values.insert(name, value);
            }
            Variable::LabelValues {
                name,
                metric,
                label,
                all_value,
            } => {
                let used = metric_names(&metric);
                assert!(
                    !used.is_empty() && used.is_subset(exported),
                    "dashboards/{file}: variable {name} reads {metric}, which ergon does not export"
                );
                let offered = await_some(
                    &format!("dashboards/{file}: values of variable {name} (label_values({metric}, {label}))"),
                    deadline,
                    || {
                        let v = api.label_values(&label, &metric).unwrap_or_else(|e| {
                            panic!("dashboards/{file}: variable {name}: {e}")
                        });
                        (!v.is_empty()).then_some(v)
                    },
                );
                let value = match chosen.get(name.as_str()) {
                    Some(want) => {
                        assert!(
                            offered.iter().any(|o| o == want)
                                || all_value.as_deref() == Some(*want),
                            "dashboards/{file}: variable {name} offers {offered:?}, not {want:?}"
                        );
                        want.to_string()
                    }
                    None => offered[0].clone(),
                };
                values.insert(name, value);
            }
        }
    }
    let mut pending: Vec<(Target, String)> = Vec::new();
    for t in d.targets() {
        let expr = substitute(&t.expr, &values);
        let left = variables_used(&expr);
        assert!(
            left.is_empty(),
            "dashboards/{file}: panel {:?} {}: ${} left in {expr}",
            t.panel,
            t.ref_id,
            left.join(", $")
        );
        let used = metric_names(&expr);
        assert!(
            !used.is_empty(),
            "dashboards/{file}: panel {:?} {}: no metric in {expr}",
            t.panel,
            t.ref_id
        );
        let unknown: Vec<&String> = used.difference(exported).collect();
        assert!(
            unknown.is_empty(),
            "dashboards/{file}: panel {:?} {} queries {unknown:?}, which ergon does not export \
             (exported: {exported:?}): {expr}",
            t.panel,
            t.ref_id
        );
        pending.push((t, expr));
    }
    let all = pending.clone();
    loop {
        let mut refusals = Vec::new();
        pending.retain(|(t, expr)| match api.eval(expr, t.instant) {
            Ok(r) => r.is_empty(),
            Err(e) => {
                refusals.push(format!("panel {:?} {}: {e}", t.panel, t.ref_id));
                false
            }
        });
        assert!(
            refusals.is_empty(),
            "dashboards/{file}: the backend refused queries:\n{}",
            refusals.join("\n")
        );
        if pending.is_empty() {
            return all;
        }
        if Instant::now() >= deadline {
            let list: Vec<String> = pending
                .iter()
                .map(|(t, e)| {
                    format!(
                        "panel {:?} {} ({}): {e}",
                        t.panel,
                        t.ref_id,
                        if t.instant { "instant" } else { "range" }
                    )
                })
                .collect();
            panic!(
                "dashboards/{file}: no data from {} queries:\n{}",
                list.len(),
                list.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn metric_names_are_the_selected_metrics_only() {
        for (expr, want) in [
            (
                "sum by (component) (rate(ergon_node_energy_joules_total{instance=\"a:1\",component=~\"gpu|cpu\"}[1m])) / 3.6e6",
                &["ergon_node_energy_joules_total"][..],
            ),
            (
                "max_over_time(sum(ergon_job_power_watts{job_id=\"42\"})[1h:15s])",
                &["ergon_job_power_watts"],
            ),
            (
                "a_total / on (instance) group_left (version) b_info offset 5m",
                &["a_total", "b_info"],
            ),
            (
                "sum(x) without (by, sum) > bool 0 and on() y{l=\"}{(\"} or vector(1)",
                &["x", "y"],
            ),
            (
                "label_replace(m, \"dst\", \"$1\", \"src\", \"(.*)\") unless n @ start()",
                &["m", "n"],
            ),
            ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))", &["h_bucket"]),
            ("ergon_usage_cost_total keep_metric_names", &["ergon_usage_cost_total"]),
            ("vector(1) + 1e3 - Inf", &[]),
        ] {
            assert_eq!(metric_names(expr), set(want), "{expr}");
        }
    }

    #[test]
    fn variables_are_found_and_substituted_longest_first() {
        assert_eq!(
            variables_used("x{a=\"$job_id\",b=\"${instance}\"}[$__range] $1"),
            vec!["job_id", "instance", "__range"]
        );
        let values = BTreeMap::from([("job_id".to_string(), "42".to_string())]);
        assert_eq!(
            substitute(
                "x{j=\"$job_id\"}[$__rate_interval] / $__range_s + y[$__range]",
                &values
            ),
            "x{j=\"42\"}[1m] / 3600 + y[1h]"
        );
    }

    #[test]
    fn exposition_names_include_summary_parts() {
        let text = "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"1\"} 3\nb 1\n\
                    s{quantile=\"0.5\"} 1\ns_sum 2\ns_count 3\n";
        assert_eq!(
            exposition_names(text),
            set(&["a_total", "b", "s", "s_sum", "s_count"])
        );
    }

    /// A dashboard with one panel over `expr`, its datasource `ds`, its panel ids `ids`.
    fn dashboard(expr: &str, ds: &str, ids: [u64; 2]) -> String {
        let ds = format!("{{\"type\": \"prometheus\", \"uid\": \"{ds}\"}}");
        format!(
            r#"{{"title": "t", "uid": "u", "schemaVersion": 39, "tags": ["ergon", "ergond"],
               "templating": {{"list": [
                 {{"name": "datasource", "type": "datasource", "query": "prometheus"}},
                 {{"name": "instance", "type": "query", "datasource": {ds},
                   "query": {{"query": "label_values(ergon_build_info, instance)"}}}}]}},
               "panels": [{{"id": {}, "type": "row", "title": "r", "collapsed": true, "panels": [
                 {{"id": {}, "type": "timeseries", "title": "p", "datasource": {ds},
                   "targets": [{{"refId": "A", "datasource": {ds}, "range": true, "instant": false,
                                 "expr": "{}"}}]}}]}}]}}"#,
            ids[0],
            ids[1],
            expr.replace('"', "\\\"")
        )
    }

    #[test]
    fn the_static_checks_refuse_what_they_should() {
        let good = dashboard(
            "rate(x{instance=\"$instance\"}[$__rate_interval])",
            "${datasource}",
            [1, 2],
        );
        let d = parse("good.json", &good).unwrap();
        assert_eq!(d.source, Source::Ergond);
        let t = d.targets();
        assert_eq!(t.len(), 1, "the row's nested panel");
        assert_eq!(t[0].panel, "p");
        for (text, why) in [
            (dashboard("x", "${datasource}", [1, 1]), "used twice"),
            (
                dashboard("x", "prometheus-uid", [1, 2]),
                "datasource must be",
            ),
            (
                dashboard("x{a=\"$nope\"}", "${datasource}", [1, 2]),
                "$nope is no template variable",
            ),
            (
                dashboard("{__name__=~\"x.*\"}", "${datasource}", [1, 2]),
                "__name__",
            ),
            (
                good.replacen("\"ergond\"", "\"other\"", 1),
                "exactly one of the tags",
            ),
            (
                good.replacen("\"range\": true", "\"range\": false", 1),
                "exactly one of \"instant\"",
            ),
            (good[..good.len() - 2].to_string(), "not valid JSON"),
        ] {
            let err = parse("bad.json", &text).unwrap_err();
            assert!(err.contains(why), "{err} (wanted {why:?})");
        }
    }
}

/// The shipped dashboards pass the static checks (here, so that `cargo test` without any
/// service checks them; the service tests evaluate them).
#[cfg(test)]
#[test]
fn shipped_dashboards_pass_the_static_checks() {
    let all = load_all();
    let by_file: BTreeMap<&str, Source> = all.iter().map(|d| (d.file.as_str(), d.source)).collect();
    for (file, source) in [
        ("node.json", Source::Ergond),
        ("job.json", Source::Ergond),
        ("site.json", Source::Accounting),
    ] {
        assert_eq!(by_file.get(file), Some(&source), "{file}");
    }
    for d in &all {
        assert!(
            d.targets().len() >= 4,
            "{}: {} targets",
            d.file,
            d.targets().len()
        );
    }
}
