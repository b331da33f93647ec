//! Carbon and cost: a job's CO2e (operational and embodied) and its energy cost, computed over
//! the job's own power trace with the factors the site configures (`[carbon]`, `[cost]` in the
//! accounting config; docs/carbon.md).
//!
//! The method, per node of the job:
//!
//! 1. **Profile.** The node's measured energy (`totals.energy_j`, the authoritative figure) is
//!    spread over the node's span `[start, end]` in the shape of its power trace: each trace bin
//!    gets a share proportional to the summed power of the node's series in that bin times the
//!    part of the bin inside the span. A part of the span the trace does not cover (a long job
//!    whose GPU samples cover only its end) gets the trace's mean power. A node without a
//!    trace has its energy spread evenly over its span. The record says which (`method`) and
//!    what fraction of the node-time the trace covered.
//! 2. **Factors interval by interval.** Each profile interval is cut wherever a factor changes
//!    (a time series' next point, a tariff window's edge), and each piece's energy is
//!    multiplied by the intensity and PUE (CO2e) or the price and PUE (cost) in force over that
//!    piece. Energy where a factor is unknown (a series that does not cover the instant) is
//!    counted as missing and reported as a fraction: no default is ever put in its place.
//! 3. **Embodied.** GPU-hours (GPUs × duration) and node-hours (nodes × duration) times the
//!    configured factors.

use ergon_protocol::format::co2e;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ergon_protocol::manifest::Manifest;
use serde::Deserialize;

pub use crate::footprint::{CarbonFigure, CostFigure, FactorUsed, Footprint, ProfileMethod};
use crate::job::JobRecordFull;

const NS: f64 = 1e9;
const J_PER_KWH: f64 = 3.6e6;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// `[carbon]`: the factors of the cluster(s), with overrides per partition and per cluster.
///
/// Each quantity (intensity, PUE, embodied) is taken from the most specific level that sets any
/// of its keys: `clusters.<C>.partitions.<P>`, `clusters.<C>`, `partitions.<P>`, the top level.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarbonConfig {
    /// Grid carbon intensity, gCO2e per kWh, constant.
    pub intensity_g_per_kwh: Option<f64>,
    /// A site-maintained CSV file `timestamp,value` of intensity (gCO2e/kWh).
    pub intensity_file: Option<PathBuf>,
    /// An HTTP(S) endpoint answering the documented JSON shape (docs/carbon.md).
    pub intensity_url: Option<String>,
    /// Where the intensity comes from, in words (shown with every figure), e.g.
    /// `"UBA 2024 German grid average, https://…"`.
    pub intensity_source: Option<String>,
    /// Power usage effectiveness, constant (≥ 1).
    pub pue: Option<f64>,
    /// A CSV file `timestamp,value` of PUE.
    pub pue_file: Option<PathBuf>,
    /// An HTTP(S) endpoint of PUE values (same shape as the intensity's).
    pub pue_url: Option<String>,
    /// Where the PUE comes from, in words.
    pub pue_source: Option<String>,
    /// Embodied emissions per GPU-hour, gCO2e.
    pub embodied_g_per_gpu_hour: Option<f64>,
    /// Embodied emissions per node-hour, gCO2e.
    pub embodied_g_per_node_hour: Option<f64>,
    /// Where the embodied factors come from, in words.
    pub embodied_source: Option<String>,
    /// A point of a time series holds until the next point, but at most this long (seconds);
    /// past that the value is missing. Default 3600.
    pub max_step_s: Option<u64>,
    /// Overrides per partition.
    #[serde(default)]
    pub partitions: BTreeMap<String, CarbonConfig>,
    /// Overrides per cluster (each may have its own `partitions`).
    #[serde(default)]
    pub clusters: BTreeMap<String, CarbonConfig>,
}

/// `[cost]`: the price of energy, with overrides per partition and per cluster (resolved as
/// for [`CarbonConfig`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostConfig {
    /// The currency's code (ISO 4217), e.g. `"EUR"`; shown with every cost.
    pub currency: Option<String>,
    /// Price per kWh, constant.
    pub price_per_kwh: Option<f64>,
    /// A CSV file `timestamp,value` of the price per kWh.
    pub price_file: Option<PathBuf>,
    /// An HTTP(S) endpoint of prices (same shape as the intensity's).
    pub price_url: Option<String>,
    /// A tariff: prices per time-of-day window.
    pub tariff: Option<Vec<TariffWindow>>,
    /// The tariff's clock: a fixed offset from UTC, `"+01:00"`; default `"+00:00"`.
    pub tariff_utc_offset: Option<String>,
    /// The tariff's clock: a time zone by its IANA name, `"Europe/Paris"`, whose daylight
    /// saving time the windows follow (instead of `tariff_utc_offset`).
    pub tariff_timezone: Option<String>,
    /// Where the price comes from, in words.
    pub price_source: Option<String>,
    /// Whether the cost is of the facility's energy (IT energy × PUE, the default) or of the IT
    /// energy alone.
    pub include_pue: Option<bool>,
    /// A point of a time series holds at most this long (seconds); default 3600.
    pub max_step_s: Option<u64>,
    /// Overrides per partition.
    #[serde(default)]
    pub partitions: BTreeMap<String, CostConfig>,
    /// Overrides per cluster.
    #[serde(default)]
    pub clusters: BTreeMap<String, CostConfig>,
}

/// One window of a tariff: `from` (inclusive) to `to` (exclusive), `HH:MM` in the tariff's
/// clock; `to` before `from` wraps past midnight.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TariffWindow {
    /// Start, `HH:MM`.
    pub from: String,
    /// End, `HH:MM` (`"24:00"` for midnight at the end of the day).
    pub to: String,
    /// Price per kWh in the window.
    pub price_per_kwh: f64,
}

fn bad(key: &str, message: impl Into<String>) -> (String, String) {
    (key.to_owned(), message.into())
}

impl CarbonConfig {
    fn intensity_set(&self) -> bool {
        self.intensity_g_per_kwh.is_some()
            || self.intensity_file.is_some()
            || self.intensity_url.is_some()
    }
    fn pue_set(&self) -> bool {
        self.pue.is_some() || self.pue_file.is_some() || self.pue_url.is_some()
    }
    fn embodied_set(&self) -> bool {
        self.embodied_g_per_gpu_hour.is_some() || self.embodied_g_per_node_hour.is_some()
    }

    /// Check the values (`prefix` names the table in messages). Errors: `(key, message)`.
    pub fn validate(&self, prefix: &str, depth: u32) -> Result<(), (String, String)> {
        let n = [
            self.intensity_g_per_kwh.is_some(),
            self.intensity_file.is_some(),
            self.intensity_url.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n > 1 {
            return Err(bad(
                &format!("{prefix}intensity_g_per_kwh"),
                "give one of intensity_g_per_kwh, intensity_file, intensity_url",
            ));
        }
        if [
            self.pue.is_some(),
            self.pue_file.is_some(),
            self.pue_url.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
            > 1
        {
            return Err(bad(
                &format!("{prefix}pue"),
                "give one of pue, pue_file, pue_url",
            ));
        }
        for (key, v, min) in [
            ("intensity_g_per_kwh", self.intensity_g_per_kwh, 0.0),
            ("pue", self.pue, 1.0),
            ("embodied_g_per_gpu_hour", self.embodied_g_per_gpu_hour, 0.0),
            (
                "embodied_g_per_node_hour",
                self.embodied_g_per_node_hour,
                0.0,
            ),
        ] {
            if let Some(v) = v {
                if !v.is_finite() || v < min {
                    return Err(bad(
                        &format!("{prefix}{key}"),
                        format!("must be a number of at least {min}"),
                    ));
                }
            }
        }
        if self.max_step_s == Some(0) {
            return Err(bad(&format!("{prefix}max_step_s"), "must be at least 1"));
        }
        for (key, url) in [
            ("intensity_url", &self.intensity_url),
            ("pue_url", &self.pue_url),
        ] {
            if let Some(url) = url {
                check_url(&format!("{prefix}{key}"), url)?;
            }
        }
        if depth >= 2 && !(self.partitions.is_empty() && self.clusters.is_empty()) {
            return Err(bad(
                prefix,
                "partitions and clusters nest at most two levels",
            ));
        }
        if depth >= 1 && !self.clusters.is_empty() && prefix.contains("partitions.") {
            return Err(bad(prefix, "a partition has no clusters"));
        }
        for (p, c) in &self.partitions {
            c.validate(&format!("{prefix}partitions.{p}."), depth + 1)?;
        }
        for (name, c) in &self.clusters {
            if !c.clusters.is_empty() {
                return Err(bad(
                    &format!("{prefix}clusters.{name}"),
                    "clusters do not nest",
                ));
            }
            c.validate(&format!("{prefix}clusters.{name}."), depth + 1)?;
        }
        Ok(())
    }
}

impl CostConfig {
    /// The tariff's clock and how to name it (`UTC+01:00`, `Europe/Paris`), or the key that is
    /// wrong and why.
    fn tariff_clock(&self) -> Result<(jiff::tz::TimeZone, String), (&'static str, String)> {
        match (&self.tariff_utc_offset, &self.tariff_timezone) {
            (Some(_), Some(_)) => Err((
                "tariff_timezone",
                "give one of tariff_utc_offset and tariff_timezone".into(),
            )),
            (_, Some(name)) => jiff::tz::TimeZone::get(name)
                .map(|tz| (tz, name.clone()))
                .map_err(|e| {
                    (
                        "tariff_timezone",
                        format!(
                            "{name:?} is not a time zone this host knows ({e}); use an IANA name \
                             such as \"Europe/Paris\" (Debian: the tzdata package)"
                        ),
                    )
                }),
            (offset, None) => {
                let off = offset.as_deref().unwrap_or("+00:00");
                let secs = parse_offset(off).map_err(|m| ("tariff_utc_offset", m))?;
                let offset = jiff::tz::Offset::from_seconds(secs as i32)
                    .map_err(|e| ("tariff_utc_offset", e.to_string()))?;
                Ok((jiff::tz::TimeZone::fixed(offset), format!("UTC{off}")))
            }
        }
    }

    fn price_set(&self) -> bool {
        self.price_per_kwh.is_some()
            || self.price_file.is_some()
            || self.price_url.is_some()
            || self.tariff.is_some()
    }

    /// Check the values. Errors: `(key, message)`.
    pub fn validate(&self, prefix: &str, depth: u32) -> Result<(), (String, String)> {
        if [
            self.price_per_kwh.is_some(),
            self.price_file.is_some(),
            self.price_url.is_some(),
            self.tariff.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
            > 1
        {
            return Err(bad(
                &format!("{prefix}price_per_kwh"),
                "give one of price_per_kwh, price_file, price_url, tariff",
            ));
        }
        if let Some(p) = self.price_per_kwh {
            if !p.is_finite() || p < 0.0 {
                return Err(bad(
                    &format!("{prefix}price_per_kwh"),
                    "must be a number of at least 0",
                ));
            }
        }
        if self.max_step_s == Some(0) {
            return Err(bad(&format!("{prefix}max_step_s"), "must be at least 1"));
        }
        if let Some(c) = &self.currency {
            if c.is_empty() || c.len() > 8 || !c.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(bad(
                    &format!("{prefix}currency"),
                    "must be a currency code such as EUR",
                ));
            }
        }
        if let Some(url) = &self.price_url {
            check_url(&format!("{prefix}price_url"), url)?;
        }
        let (clock, _) = self
            .tariff_clock()
            .map_err(|(key, m)| bad(&format!("{prefix}{key}"), m))?;
        if let Some(t) = &self.tariff {
            Tariff::new(t, clock).map_err(|m| bad(&format!("{prefix}tariff"), m))?;
        }
        if depth >= 2 && !(self.partitions.is_empty() && self.clusters.is_empty()) {
            return Err(bad(
                prefix,
                "partitions and clusters nest at most two levels",
            ));
        }
        for (p, c) in &self.partitions {
            if !c.clusters.is_empty() {
                return Err(bad(
                    &format!("{prefix}partitions.{p}"),
                    "a partition has no clusters",
                ));
            }
            c.validate(&format!("{prefix}partitions.{p}."), depth + 1)?;
        }
        for (name, c) in &self.clusters {
            if !c.clusters.is_empty() {
                return Err(bad(
                    &format!("{prefix}clusters.{name}"),
                    "clusters do not nest",
                ));
            }
            c.validate(&format!("{prefix}clusters.{name}."), depth + 1)?;
        }
        Ok(())
    }
}

fn check_url(key: &str, url: &str) -> Result<(), (String, String)> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(bad(key, "must be an http:// or https:// URL"))
    }
}

/// The levels of a config that apply to (cluster, partition), most specific first.
fn levels<'a, T>(
    top: &'a T,
    partitions: impl Fn(&'a T) -> &'a BTreeMap<String, T>,
    clusters: impl Fn(&'a T) -> &'a BTreeMap<String, T>,
    cluster: &str,
    partition: Option<&str>,
) -> Vec<&'a T> {
    let mut out = Vec::new();
    if let Some(c) = clusters(top).get(cluster) {
        if let Some(p) = partition.and_then(|p| partitions(c).get(p)) {
            out.push(p);
        }
        out.push(c);
    }
    if let Some(p) = partition.and_then(|p| partitions(top).get(p)) {
        out.push(p);
    }
    out.push(top);
    out
}

// ---------------------------------------------------------------------------------------------
// Factors over time
// ---------------------------------------------------------------------------------------------

/// A time series: points sorted by time; each holds until the next, at most `max_step_ns`.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// `(unix ns, value)`, sorted, distinct times.
    pub points: Vec<(u64, f64)>,
    /// The longest a point holds.
    pub max_step_ns: u64,
}

impl Series {
    /// The value at `t` (or `None`) and the first instant after `t` where that may change.
    fn at(&self, t: u64) -> (Option<f64>, u64) {
        let i = self.points.partition_point(|p| p.0 <= t);
        if i == 0 {
            return (None, self.points.first().map_or(u64::MAX, |p| p.0));
        }
        let (t0, v) = self.points[i - 1];
        let next = self.points.get(i).map_or(u64::MAX, |p| p.0);
        let expires = t0.saturating_add(self.max_step_ns);
        if t < expires {
            (Some(v), next.min(expires))
        } else {
            (None, next)
        }
    }
}

/// Prices per time-of-day window, in a clock: a fixed offset from UTC or a time zone with its
/// daylight saving time.
#[derive(Debug, Clone, PartialEq)]
pub struct Tariff {
    /// `(from, to, price)` in seconds of the day, `from < to` (wrapping windows are split).
    windows: Vec<(u64, u64, f64)>,
    /// The windows' clock.
    clock: jiff::tz::TimeZone,
}

fn parse_hhmm(s: &str) -> Result<u64, String> {
    let err = || format!("{s:?} is not a time of day HH:MM");
    let (h, m) = s.split_once(':').ok_or_else(err)?;
    let all = |x: &str| x.len() == 2 && x.bytes().all(|b| b.is_ascii_digit());
    if !all(h) || !all(m) {
        return Err(err());
    }
    let (h, m): (u64, u64) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(err());
    }
    Ok(h * 3600 + m * 60)
}

fn parse_offset(s: &str) -> Result<i64, String> {
    let err = || format!("{s:?} is not a UTC offset such as +01:00");
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(err()),
    };
    let secs = parse_hhmm(rest).map_err(|_| err())?;
    if secs > 18 * 3600 {
        return Err(err());
    }
    Ok(sign * secs as i64)
}

impl Tariff {
    /// A tariff from its windows; overlapping windows are refused.
    pub fn new(windows: &[TariffWindow], clock: jiff::tz::TimeZone) -> Result<Tariff, String> {
        if windows.is_empty() {
            return Err("a tariff needs at least one window".into());
        }
        let mut out = Vec::new();
        for w in windows {
            let (a, b) = (parse_hhmm(&w.from)?, parse_hhmm(&w.to)?);
            if !w.price_per_kwh.is_finite() || w.price_per_kwh < 0.0 {
                return Err(format!(
                    "window {}-{}: price_per_kwh must be a number of at least 0",
                    w.from, w.to
                ));
            }
            match a.cmp(&b) {
                std::cmp::Ordering::Less => out.push((a, b, w.price_per_kwh)),
                std::cmp::Ordering::Greater => {
                    out.push((a, 86_400, w.price_per_kwh));
                    if b > 0 {
                        out.push((0, b, w.price_per_kwh));
                    }
                }
                std::cmp::Ordering::Equal => {
                    return Err(format!("window {}-{} is empty", w.from, w.to))
                }
            }
        }
        out.sort_by_key(|w| w.0);
        for pair in out.windows(2) {
            if pair[1].0 < pair[0].1 {
                return Err("tariff windows overlap".into());
            }
        }
        Ok(Tariff {
            windows: out,
            clock,
        })
    }

    /// The price at `t` (ns since the epoch) and the next instant it may change: the next
    /// window edge in the tariff's clock (across a daylight saving change too).
    fn at(&self, t: u64) -> (Option<f64>, u64) {
        let Ok(now) = jiff::Timestamp::from_nanosecond(i128::from(t)) else {
            return (None, u64::MAX);
        };
        let local = now.to_zoned_datetime(self.clock.clone());
        let sod = local.hour() as u64 * 3600 + local.minute() as u64 * 60 + local.second() as u64;
        let mut value = None;
        let mut next = 86_400;
        for &(a, b, p) in &self.windows {
            if a <= sod && sod < b {
                value = Some(p);
                next = next.min(b);
            } else if a > sod {
                next = next.min(a);
            }
        }
        // The next edge as an instant. A local time the clock skips (spring forward) is taken
        // as the instant just after the gap, one it passes twice (fall back) at its first
        // passage, or at its second when the first is not after `t`.
        let edge = if next >= 86_400 {
            local
                .date()
                .tomorrow()
                .ok()
                .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
        } else {
            Some(
                local
                    .date()
                    .at((next / 3600) as i8, (next % 3600 / 60) as i8, 0, 0),
            )
        };
        let after = |z: Result<jiff::Timestamp, jiff::Error>| {
            z.ok()
                .map(|z| z.as_nanosecond())
                .filter(|&ns| ns > i128::from(t))
                .and_then(|ns| u64::try_from(ns).ok())
        };
        let next_ns = edge.and_then(|dt| {
            let ambiguous = self.clock.to_ambiguous_timestamp(dt);
            after(ambiguous.compatible()).or_else(|| after(ambiguous.later()))
        });
        // The clock's own next change (daylight saving) also moves the local time of day.
        let change = self
            .clock
            .following(now)
            .next()
            .and_then(|c| after(Ok(c.timestamp())));
        let next_ns = match (next_ns, change) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Never stuck: at worst, look again a second later.
        (value, next_ns.unwrap_or(t.saturating_add(1_000_000_000)))
    }
}

/// Where a factor's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// One value.
    Static(f64),
    /// A time series (file or URL).
    Series(Series),
    /// A tariff.
    Tariff(Tariff),
    /// The source could not be read: every instant is missing (the reason is in the
    /// factor's `source`).
    Unavailable,
}

impl Values {
    fn at(&self, t: u64) -> (Option<f64>, u64) {
        match self {
            Values::Static(v) => (Some(*v), u64::MAX),
            Values::Series(s) => s.at(t),
            Values::Tariff(t2) => t2.at(t),
            Values::Unavailable => (None, u64::MAX),
        }
    }
}

/// A factor as applied: its values and a description of where they come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Factor {
    /// The values.
    pub values: Values,
    /// `static`, `file <path>`, `url <url>`, `tariff …`.
    pub origin: String,
    /// The site's words on the source (`*_source`).
    pub source: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Energy over time
// ---------------------------------------------------------------------------------------------

/// A piece of a node's energy: `[start, end)` in Unix ns and its joules (`start == end` for a
/// zero-length job).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Piece {
    /// Start, Unix ns.
    pub start: u64,
    /// End, Unix ns.
    pub end: u64,
    /// Joules.
    pub energy_j: f64,
}

/// One node's energy laid out over its span: the pieces, and the nanoseconds of the span the
/// trace covered.
pub fn profile(m: &Manifest) -> (Vec<Piece>, u64) {
    let (s, e, energy) = (m.start_unix_ns, m.end_unix_ns, m.totals.energy_j.max(0.0));
    let even = vec![Piece {
        start: s,
        end: e,
        energy_j: energy,
    }];
    let len = m
        .trace
        .series
        .iter()
        .map(|x| x.watts.len())
        .max()
        .unwrap_or(0);
    let dt = u64::from(m.trace.interval_ms) * 1_000_000;
    if e <= s || len == 0 || dt == 0 {
        return (even, 0);
    }
    // Summed power per bin over the series that have the bin.
    let mut bins: Vec<(u64, u64, f64)> = Vec::new();
    for i in 0..len {
        let b0 = m.trace.start_unix_ns.saturating_add(i as u64 * dt);
        let b1 = b0.saturating_add(dt);
        let (a, b) = (b0.max(s), b1.min(e));
        if a >= b {
            continue;
        }
        let p: f64 = m
            .trace
            .series
            .iter()
            .filter_map(|x| x.watts.get(i))
            .map(|w| f64::from(*w).max(0.0))
            .sum();
        bins.push((a, b, p));
    }
    let covered: u64 = bins.iter().map(|b| b.1 - b.0).sum();
    let weight: f64 = bins.iter().map(|b| b.2 * (b.1 - b.0) as f64).sum();
    if covered == 0 || weight <= 0.0 {
        return (even, 0);
    }
    let mean_p = weight / covered as f64;
    let mut raw: Vec<(u64, u64, f64)> = Vec::new();
    let mut at = s;
    for &(a, b, p) in &bins {
        if a > at {
            raw.push((at, a, mean_p * (a - at) as f64));
        }
        raw.push((a, b, p * (b - a) as f64));
        at = b;
    }
    if at < e {
        raw.push((at, e, mean_p * (e - at) as f64));
    }
    let total: f64 = raw.iter().map(|r| r.2).sum();
    let pieces = raw
        .into_iter()
        .map(|(a, b, w)| Piece {
            start: a,
            end: b,
            energy_j: energy * w / total,
        })
        .collect();
    (pieces, covered)
}

/// Sums of energy × one or two factors over pieces, cut where a factor changes.
#[derive(Debug, Default)]
struct Integral {
    /// Σ e × f1 × f2 over the known part, J·units.
    weighted: f64,
    /// Energy where both were known.
    known_j: f64,
    /// Energy where one was unknown.
    missing_j: f64,
    /// Time where one was unknown, ns.
    missing_ns: f64,
    /// Σ e × f1 (for f1's energy-weighted mean) and f1's range.
    f1: Stats,
    f2: Stats,
}

#[derive(Debug, Default)]
struct Stats {
    sum: f64,
    energy: f64,
    min: Option<f64>,
    max: Option<f64>,
}

impl Stats {
    fn add(&mut self, v: f64, e: f64) {
        self.sum += v * e;
        self.energy += e;
        self.min = Some(self.min.map_or(v, |m| m.min(v)));
        self.max = Some(self.max.map_or(v, |m| m.max(v)));
    }
}

fn integrate(pieces: &[Piece], f1: &Values, f2: Option<&Values>) -> Integral {
    let mut out = Integral::default();
    for p in pieces {
        if p.end <= p.start {
            // A zero-length job: its energy at one instant.
            let (a, _) = f1.at(p.start);
            let (b, _) = f2.map_or((Some(1.0), 0), |f| f.at(p.start));
            out.add(a, b, p.energy_j, 0, f2.is_some());
            continue;
        }
        let power = p.energy_j / (p.end - p.start) as f64;
        let mut t = p.start;
        while t < p.end {
            let (a, na) = f1.at(t);
            let (b, nb) = f2.map_or((Some(1.0), u64::MAX), |f| f.at(t));
            let until = na.min(nb).min(p.end).max(t + 1);
            let ns = until - t;
            out.add(a, b, power * ns as f64, ns, f2.is_some());
            t = until;
        }
    }
    out
}

impl Integral {
    fn add(&mut self, a: Option<f64>, b: Option<f64>, e: f64, ns: u64, has_f2: bool) {
        match (a, b) {
            (Some(a), Some(b)) => {
                self.weighted += e * a * b;
                self.known_j += e;
                self.f1.add(a, e);
                if has_f2 {
                    self.f2.add(b, e);
                }
            }
            _ => {
                self.missing_j += e;
                self.missing_ns += ns as f64;
            }
        }
    }
}

fn used(f: &Factor, s: &Stats) -> FactorUsed {
    let value = match &f.values {
        Values::Static(v) => Some(*v),
        _ => (s.energy > 0.0).then(|| s.sum / s.energy),
    };
    let varying = !matches!(f.values, Values::Static(_));
    FactorUsed {
        origin: f.origin.clone(),
        source: f.source.clone(),
        value,
        min: s.min.filter(|_| varying),
        max: s.max.filter(|_| varying),
    }
}

// ---------------------------------------------------------------------------------------------
// Loading the factors
// ---------------------------------------------------------------------------------------------

/// A CSV time series `timestamp,value`: a header line is allowed, `#` starts a comment, a
/// timestamp is Unix seconds (integer or decimal) or `YYYY-MM-DDTHH:MM[:SS][Z]` in UTC.
pub fn parse_csv(text: &str, max_step_s: u64) -> Result<Series, String> {
    let mut points: Vec<(u64, f64)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (ts, v) = line
            .split_once(',')
            .ok_or_else(|| format!("line {}: not `timestamp,value`", n + 1))?;
        let (ts, v) = (ts.trim(), v.trim());
        let t = match parse_timestamp(ts) {
            Ok(t) => t,
            // The header.
            Err(_) if points.is_empty() && v.parse::<f64>().is_err() => continue,
            Err(e) => return Err(format!("line {}: {e}", n + 1)),
        };
        let v: f64 = v
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("line {}: {v:?} is not a number of at least 0", n + 1))?;
        points.push((t, v));
    }
    series(points, max_step_s)
}

fn series(mut points: Vec<(u64, f64)>, max_step_s: u64) -> Result<Series, String> {
    if points.is_empty() {
        return Err("no values".into());
    }
    points.sort_by_key(|p| p.0);
    if let Some(w) = points.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!(
            "two values for {}",
            crate::time::format_time(w[0].0)
        ));
    }
    Ok(Series {
        points,
        max_step_ns: max_step_s.saturating_mul(1_000_000_000),
    })
}

fn parse_timestamp(s: &str) -> Result<u64, String> {
    // Unix seconds, exactly: `S` or `S.FFFFFFFFF` (up to nanoseconds).
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    if !whole.is_empty() && digits(whole) && digits(frac) && frac.len() <= 9 {
        let secs: u64 = whole.parse().map_err(|_| format!("{s:?} is too large"))?;
        let frac_ns: u64 = format!("{frac:0<9}").parse().unwrap_or(0);
        return secs
            .checked_mul(1_000_000_000)
            .and_then(|n| n.checked_add(frac_ns))
            .ok_or_else(|| format!("{s:?} is too large"));
    }
    crate::time::parse_time(s.trim_end_matches('Z'))
}

/// The JSON an intensity (or PUE, or price) endpoint answers (docs/carbon.md):
/// `{"unit": "gCO2e/kWh", "data": [{"time": "2026-12-06T10:00:00Z", "value": 312.5}, …]}`;
/// `time` may also be Unix seconds.
#[derive(Debug, Deserialize)]
struct UrlAnswer {
    #[serde(default)]
    unit: Option<String>,
    data: Vec<UrlPoint>,
}

#[derive(Debug, Deserialize)]
struct UrlPoint {
    time: serde_json::Value,
    value: f64,
}

/// Read an endpoint's answer.
pub fn parse_url_answer(body: &[u8], max_step_s: u64) -> Result<(Series, Option<String>), String> {
    let a: UrlAnswer =
        serde_json::from_slice(body).map_err(|e| format!("not the documented JSON: {e}"))?;
    let mut points = Vec::with_capacity(a.data.len());
    for p in a.data {
        let t = match &p.time {
            serde_json::Value::Number(n) => n
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| (s * NS).round() as u64)
                .ok_or_else(|| format!("time {n} is not Unix seconds"))?,
            serde_json::Value::String(s) => parse_timestamp(s)?,
            other => return Err(format!("time {other} is neither a string nor a number")),
        };
        if !p.value.is_finite() || p.value < 0.0 {
            return Err(format!("value {} is not a number of at least 0", p.value));
        }
        points.push((t, p.value));
    }
    Ok((series(points, max_step_s)?, a.unit))
}

/// An endpoint's answer: the span asked for, and the series or why not.
type Fetched = ((u64, u64), Result<Series, String>);

/// The factors of a run, with the sources read once (files when first needed, each URL once per
/// run over the span of the jobs asked for, refetched only for a job outside it).
pub struct Factors {
    carbon: Option<CarbonConfig>,
    cost: Option<CostConfig>,
    /// Per file: the series or why not.
    files: Mutex<BTreeMap<(PathBuf, u64), Result<Series, String>>>,
    /// Per URL: the span fetched and the series or why not.
    urls: Mutex<BTreeMap<(String, u64), Fetched>>,
    timeout_s: u64,
}

impl Factors {
    /// The factors of `config` (`None`: nothing configured).
    pub fn new(carbon: Option<&CarbonConfig>, cost: Option<&CostConfig>) -> Option<Factors> {
        if carbon.is_none() && cost.is_none() {
            return None;
        }
        Some(Factors {
            carbon: carbon.cloned(),
            cost: cost.cloned(),
            files: Mutex::default(),
            urls: Mutex::default(),
            timeout_s: 30,
        })
    }

    fn file(&self, path: &Path, max_step_s: u64) -> Factor {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let got = files
            .entry((path.to_path_buf(), max_step_s))
            .or_insert_with(|| {
                std::fs::read_to_string(path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| parse_csv(&t, max_step_s))
            })
            .clone();
        from_source(format!("file {}", path.display()), got)
    }

    fn url(&self, url: &str, max_step_s: u64, span: (u64, u64)) -> Factor {
        let mut urls = self.urls.lock().unwrap_or_else(|e| e.into_inner());
        let key = (url.to_owned(), max_step_s);
        let cached = urls
            .get(&key)
            .filter(|(have, _)| have.0 <= span.0 && span.1 <= have.1);
        let got = match cached {
            Some((_, got)) => got.clone(),
            None => {
                // One request over the union of what was asked for so far, so that the next
                // jobs of the run (close in time) come from the cache.
                let want = urls
                    .get(&key)
                    .map_or(span, |(h, _)| (h.0.min(span.0), h.1.max(span.1)));
                let got = fetch(url, want, max_step_s, self.timeout_s);
                urls.insert(key, (want, got.clone()));
                got
            }
        };
        from_source(format!("url {url}"), got)
    }

    fn pick(
        &self,
        static_v: Option<f64>,
        file: &Option<PathBuf>,
        url: &Option<String>,
        max_step_s: u64,
        span: (u64, u64),
        source: &Option<String>,
    ) -> Option<Factor> {
        let mut f = if let Some(v) = static_v {
            Factor {
                values: Values::Static(v),
                origin: "static".into(),
                source: None,
            }
        } else if let Some(p) = file {
            self.file(p, max_step_s)
        } else if let Some(u) = url {
            self.url(u, max_step_s, span)
        } else {
            return None;
        };
        f.source = source.clone();
        Some(f)
    }

    /// The footprint of `record` over `manifests` (its nodes' manifests, traces included when
    /// they were read).
    pub fn footprint(&self, record: &JobRecordFull, manifests: &[Manifest]) -> Footprint {
        let mut pieces = Vec::new();
        let (mut covered, mut span) = (0u64, 0u64);
        let mut any_trace = false;
        let nodes: Vec<&Manifest> = record
            .nodes
            .iter()
            .filter_map(|n| manifests.iter().find(|m| m.content_hash == n.manifest_hash))
            .collect();
        for m in &nodes {
            let (p, c) = profile(m);
            pieces.extend(p);
            covered += c;
            span += m.end_unix_ns.saturating_sub(m.start_unix_ns);
            any_trace |= c > 0;
        }
        if nodes.is_empty() {
            // A record read back without its manifests: the job's energy evenly over its span.
            pieces.push(Piece {
                start: record.start_unix_ns,
                end: record.end_unix_ns,
                energy_j: record.energy_j,
            });
            span = record.end_unix_ns.saturating_sub(record.start_unix_ns);
        }
        let trace_time_fraction = if span > 0 {
            covered as f64 / span as f64
        } else {
            0.0
        };
        let method = if !any_trace {
            ProfileMethod::Even
        } else if trace_time_fraction >= 0.99 {
            ProfileMethod::Trace
        } else {
            ProfileMethod::TracePartial
        };
        let jspan = (
            record.start_unix_ns,
            record.end_unix_ns.max(record.start_unix_ns),
        );
        let partition = record.partition.as_deref();
        let carbon = self.carbon.as_ref().and_then(|c| {
            let lv = levels(
                c,
                |x| &x.partitions,
                |x| &x.clusters,
                &record.cluster,
                partition,
            );
            let max_step = lv.iter().find_map(|l| l.max_step_s).unwrap_or(3600);
            let i = lv.iter().find(|l| l.intensity_set()).and_then(|l| {
                self.pick(
                    l.intensity_g_per_kwh,
                    &l.intensity_file,
                    &l.intensity_url,
                    max_step,
                    jspan,
                    &l.intensity_source,
                )
            })?;
            let pue = lv
                .iter()
                .find(|l| l.pue_set())
                .and_then(|l| {
                    self.pick(
                        l.pue,
                        &l.pue_file,
                        &l.pue_url,
                        max_step,
                        jspan,
                        &l.pue_source,
                    )
                })
                .unwrap_or(Factor {
                    values: Values::Static(1.0),
                    origin: "static (no PUE configured)".into(),
                    source: None,
                });
            let emb = lv.iter().find(|l| l.embodied_set());
            Some(self.carbon_figure(record, &pieces, span, i, pue, emb.copied()))
        });
        let cost = self.cost.as_ref().and_then(|c| {
            let lv = levels(
                c,
                |x| &x.partitions,
                |x| &x.clusters,
                &record.cluster,
                partition,
            );
            let max_step = lv.iter().find_map(|l| l.max_step_s).unwrap_or(3600);
            let l = lv.iter().find(|l| l.price_set())?;
            let mut price = match &l.tariff {
                Some(t) => {
                    let tariff = l
                        .tariff_clock()
                        .map_err(|(_, e)| e)
                        .and_then(|(clock, name)| Ok((Tariff::new(t, clock)?, name)));
                    match tariff {
                        Ok((t2, clock)) => Factor {
                            values: Values::Tariff(t2),
                            origin: format!(
                                "tariff {} {clock}",
                                t.iter()
                                    .map(|w| format!("{}-{} {}", w.from, w.to, w.price_per_kwh))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                            source: None,
                        },
                        Err(e) => Factor {
                            values: Values::Unavailable,
                            origin: format!("tariff: {e}"),
                            source: None,
                        },
                    }
                }
                None => self.pick(
                    l.price_per_kwh,
                    &l.price_file,
                    &l.price_url,
                    max_step,
                    jspan,
                    &None,
                )?,
            };
            price.source = l.price_source.clone();
            let include_pue = lv.iter().find_map(|l| l.include_pue).unwrap_or(true);
            let currency = lv.iter().find_map(|l| l.currency.clone());
            let pue = if include_pue {
                // The PUE of [carbon] (the facility's), when configured.
                self.carbon.as_ref().and_then(|c| {
                    let lv = levels(
                        c,
                        |x| &x.partitions,
                        |x| &x.clusters,
                        &record.cluster,
                        partition,
                    );
                    let ms = lv.iter().find_map(|l| l.max_step_s).unwrap_or(3600);
                    lv.iter().find(|l| l.pue_set()).and_then(|l| {
                        self.pick(l.pue, &l.pue_file, &l.pue_url, ms, jspan, &l.pue_source)
                    })
                })
            } else {
                None
            };
            let int = integrate(&pieces, &price.values, pue.as_ref().map(|p| &p.values));
            let total = int.known_j + int.missing_j;
            Some(CostFigure {
                amount: int.weighted / J_PER_KWH,
                currency,
                missing_energy_fraction: if total > 0.0 {
                    int.missing_j / total
                } else {
                    0.0
                },
                price: used(&price, &int.f1),
                pue: pue.as_ref().map(|p| used(p, &int.f2)),
            })
        });
        Footprint {
            method,
            trace_time_fraction,
            carbon,
            cost,
        }
    }

    fn carbon_figure(
        &self,
        record: &JobRecordFull,
        pieces: &[Piece],
        span_ns: u64,
        intensity: Factor,
        pue: Factor,
        emb: Option<&CarbonConfig>,
    ) -> CarbonFigure {
        let int = integrate(pieces, &intensity.values, Some(&pue.values));
        let total = int.known_j + int.missing_j;
        let gpu_hours = record.gpus.len() as f64 * record.duration_s / 3600.0;
        let node_hours = record.nodes.len() as f64 * record.duration_s / 3600.0;
        let (fg, fnode) = (
            emb.and_then(|e| e.embodied_g_per_gpu_hour),
            emb.and_then(|e| e.embodied_g_per_node_hour),
        );
        let embodied_g =
            emb.map(|_| fg.map_or(0.0, |f| f * gpu_hours) + fnode.map_or(0.0, |f| f * node_hours));
        let operational_g = int.weighted / J_PER_KWH;
        CarbonFigure {
            operational_g,
            embodied_g,
            total_g: operational_g + embodied_g.unwrap_or(0.0),
            missing_energy_fraction: if total > 0.0 {
                int.missing_j / total
            } else {
                0.0
            },
            missing_time_fraction: if span_ns > 0 {
                (int.missing_ns / span_ns as f64).min(1.0)
            } else if int.missing_j > 0.0 {
                1.0
            } else {
                0.0
            },
            intensity: used(&intensity, &int.f1),
            pue: used(&pue, &int.f2),
            embodied_g_per_gpu_hour: fg,
            embodied_g_per_node_hour: fnode,
            embodied_source: emb.and_then(|e| e.embodied_source.clone()),
            gpu_hours,
            node_hours,
        }
    }

    /// Set `record.footprint` from `manifests`.
    pub fn apply(&self, record: &mut JobRecordFull, manifests: &[Manifest]) {
        record.footprint = Some(self.footprint(record, manifests));
    }
}

fn from_source(origin: String, got: Result<Series, String>) -> Factor {
    match got {
        Ok(s) => Factor {
            values: Values::Series(s),
            origin,
            source: None,
        },
        Err(e) => {
            tracing::warn!("{origin}: {e}; the figures that need it are reported as missing");
            Factor {
                values: Values::Unavailable,
                origin: format!("{origin} (unavailable: {e})"),
                source: None,
            }
        }
    }
}

/// GET `url?start=<unix s>&end=<unix s>` and read the answer.
fn fetch(url: &str, span: (u64, u64), max_step_s: u64, timeout_s: u64) -> Result<Series, String> {
    // A point before the job's start still holds at its start: ask from one step earlier.
    let start = (span.0 / 1_000_000_000).saturating_sub(max_step_s);
    let end = span.1.div_ceil(1_000_000_000);
    let sep = if url.contains('?') { '&' } else { '?' };
    let full = format!("{url}{sep}start={start}&end={end}");
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(timeout_s))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client.get(&full).send().map_err(|e| e.to_string())?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let body = resp.bytes().map_err(|e| e.to_string())?;
    parse_url_answer(&body, max_step_s).map(|(s, _)| s)
}

/// A number with at most 4 decimals, trailing zeros dropped.
fn num(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_owned()
}

/// A cost: two decimals, four below 1.
pub fn money(v: f64) -> String {
    if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

fn factor_text(f: &FactorUsed, unit: &str) -> String {
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    let mut s = match (f.value, f.min, f.max) {
        (Some(v), Some(lo), Some(hi)) if hi > lo => format!(
            "{}{unit} (energy-weighted mean; {} to {})",
            num(v),
            num(lo),
            num(hi)
        ),
        (Some(v), _, _) => format!("{}{unit}", num(v)),
        (None, _, _) => "unknown".to_owned(),
    };
    s += &format!(", {}", f.origin);
    if let Some(src) = &f.source {
        s += &format!(" [{src}]");
    }
    s
}

/// The footprint as lines of `ergon report` (each starting with `indent`).
pub fn render(f: &Footprint, indent: &str) -> String {
    let mut out = String::new();
    let method = match f.method {
        ProfileMethod::Trace => "over the nodes' power traces".to_owned(),
        ProfileMethod::TracePartial => format!(
            "over the nodes' power traces where they cover the job ({} of its node-time), the rest at the traces' mean power",
            ergon_protocol::format::percent(f.trace_time_fraction)
        ),
        ProfileMethod::Even => "energy spread evenly over each node's span (no power trace)".to_owned(),
    };
    if let Some(c) = &f.carbon {
        out += &format!(
            "{indent}co2e      {} = operational {}{} ({method})\n",
            co2e(c.total_g),
            co2e(c.operational_g),
            c.embodied_g
                .map(|e| format!(" + embodied {}", co2e(e)))
                .unwrap_or_default()
        );
        if c.missing_energy_fraction > 0.0 {
            out += &format!(
                "{indent}          missing intensity or PUE for {} of the job's energy ({} of its time): that part is not in the figure\n",
                ergon_protocol::format::percent(c.missing_energy_fraction),
                ergon_protocol::format::percent(c.missing_time_fraction)
            );
        }
        out += &format!(
            "{indent}          intensity {}\n",
            factor_text(&c.intensity, "gCO2e/kWh")
        );
        out += &format!("{indent}          PUE {}\n", factor_text(&c.pue, ""));
        if c.embodied_g.is_some() {
            let mut parts = Vec::new();
            if let Some(g) = c.embodied_g_per_gpu_hour {
                parts.push(format!("{} g/GPU-h × {:.3} GPU-h", num(g), c.gpu_hours));
            }
            if let Some(n) = c.embodied_g_per_node_hour {
                parts.push(format!("{} g/node-h × {:.3} node-h", num(n), c.node_hours));
            }
            out += &format!(
                "{indent}          embodied {}{}\n",
                parts.join(" + "),
                c.embodied_source
                    .as_ref()
                    .map(|s| format!(" [{s}]"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(c) = &f.cost {
        out += &format!(
            "{indent}cost      {}{} ({method})\n",
            money(c.amount),
            c.currency
                .as_ref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default()
        );
        if c.missing_energy_fraction > 0.0 {
            out += &format!(
                "{indent}          missing price{} for {} of the job's energy: that part is not in the figure\n",
                if c.pue.is_some() { " or PUE" } else { "" },
                ergon_protocol::format::percent(c.missing_energy_fraction)
            );
        }
        out += &format!(
            "{indent}          price {}\n",
            factor_text(
                &c.price,
                &format!("{}/kWh", c.currency.as_deref().unwrap_or(""))
            )
        );
        match &c.pue {
            Some(p) => {
                out += &format!(
                    "{indent}          PUE {} (cost of the facility's energy)\n",
                    factor_text(p, "")
                )
            }
            None => out += &format!("{indent}          of the IT energy (no PUE applied)\n"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::combine;
    use ergon_protocol::testing::ManifestBuilder;

    /// 2026-01-01T00:00:00Z.
    const T0: u64 = 1_767_225_600;
    const H: u64 = 3600;

    fn ns(s: u64) -> u64 {
        s * 1_000_000_000
    }

    /// One node, two hours from T0, GPU energy `energy_j`, a trace of 100 W then 300 W (one
    /// bin an hour) unless `trace` is false.
    fn job(energy_j: f64, trace: bool) -> (JobRecordFull, Vec<Manifest>) {
        let mut b = ManifestBuilder::new("c", 1, "n1")
            .span(ns(T0), ns(T0 + 2 * H))
            .partition("gpu")
            .gpu(Some(energy_j));
        if trace {
            b = b.trace(3_600_000, [("gpu0", vec![100.0f32, 300.0])]);
        }
        let m = vec![b.build()];
        (combine(&m), m)
    }

    fn carbon(toml_text: &str) -> Factors {
        let c: CarbonConfig = toml::from_str(toml_text).unwrap();
        c.validate("carbon.", 0).unwrap();
        Factors::new(Some(&c), None).unwrap()
    }

    fn cost(toml_text: &str) -> Factors {
        let c: CostConfig = toml::from_str(toml_text).unwrap();
        c.validate("cost.", 0).unwrap();
        Factors::new(None, Some(&c)).unwrap()
    }

    fn csv(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn static_factors_multiply_the_energy() {
        // 1 kWh × 400 g/kWh × PUE 1.5 = 600 g.
        let (r, m) = job(3.6e6, true);
        let f = carbon("intensity_g_per_kwh = 400\npue = 1.5\nintensity_source = \"grid avg\"")
            .footprint(&r, &m);
        let c = f.carbon.unwrap();
        assert!((c.operational_g - 600.0).abs() < 1e-9, "{c:?}");
        assert_eq!(c.total_g, c.operational_g);
        assert_eq!(c.missing_energy_fraction, 0.0);
        assert_eq!(c.intensity.value, Some(400.0));
        assert_eq!(c.intensity.origin, "static");
        assert_eq!(c.intensity.source.as_deref(), Some("grid avg"));
        assert_eq!(f.method, ProfileMethod::Trace);
        assert_eq!(f.trace_time_fraction, 1.0);
    }

    #[test]
    fn a_varying_intensity_is_applied_bin_by_bin_not_at_the_average() {
        let dir = tempfile::tempdir().unwrap();
        let file = csv(
            dir.path(),
            "i.csv",
            &format!("timestamp,value\n# hourly\n{T0},200\n{},500\n", T0 + H),
        );
        let f = carbon(&format!("intensity_file = {:?}", file.to_str().unwrap()));
        // The trace: 100 W for an hour (0.1 kWh at 200 g) and 300 W for an hour (0.3 kWh at
        // 500 g): 20 + 150 = 170 g. At the job's average (0.4 kWh at 350 g) it would be 140 g.
        let (r, m) = job(1.44e6, true);
        let c = f.footprint(&r, &m).carbon.unwrap();
        assert!((c.operational_g - 170.0).abs() < 1e-6, "{c:?}");
        // The intensity's energy-weighted mean reproduces the figure: 170 / 0.4.
        assert!((c.intensity.value.unwrap() - 425.0).abs() < 1e-6);
        assert_eq!(
            (c.intensity.min, c.intensity.max),
            (Some(200.0), Some(500.0))
        );
        assert!(c.intensity.origin.starts_with("file "));
        // The measured energy is what counts; the trace gives its shape: twice the energy,
        // twice the CO2e.
        let (r, m) = job(2.88e6, true);
        let c = f.footprint(&r, &m).carbon.unwrap();
        assert!((c.operational_g - 340.0).abs() < 1e-6, "{c:?}");
        // Without a trace the energy is spread evenly: 0.2 kWh an hour, 40 + 100 = 140 g.
        let (r, m) = job(1.44e6, false);
        let fp = f.footprint(&r, &m);
        assert_eq!(fp.method, ProfileMethod::Even);
        assert!((fp.carbon.unwrap().operational_g - 140.0).abs() < 1e-6);
    }

    #[test]
    fn missing_intensity_is_reported_never_defaulted() {
        let dir = tempfile::tempdir().unwrap();
        // One point, held for an hour at most: the second hour has no intensity.
        let file = csv(dir.path(), "i.csv", &format!("{T0},200\n"));
        let f = carbon(&format!(
            "intensity_file = {:?}\nmax_step_s = 3600",
            file.to_str().unwrap()
        ));
        let (r, m) = job(1.44e6, true);
        let fp = f.footprint(&r, &m);
        let c = fp.carbon.as_ref().unwrap();
        assert!((c.operational_g - 20.0).abs() < 1e-6, "{c:?}");
        assert!((c.missing_energy_fraction - 0.75).abs() < 1e-9);
        assert!((c.missing_time_fraction - 0.5).abs() < 1e-9);
        let text = render(&fp, "");
        assert!(
            text.contains(
                "missing intensity or PUE for 75.0% of the job's energy (50.0% of its time)"
            ),
            "{text}"
        );
        // A file that cannot be read: all missing, and the reason named.
        let f = carbon("intensity_file = \"/nonexistent/i.csv\"");
        let c = f.footprint(&r, &m).carbon.unwrap();
        assert_eq!(c.operational_g, 0.0);
        assert_eq!(c.missing_energy_fraction, 1.0);
        assert!(
            c.intensity.origin.contains("unavailable"),
            "{}",
            c.intensity.origin
        );
    }

    #[test]
    fn a_partial_trace_fills_the_rest_at_its_mean_power() {
        // Two hours; the trace covers only the second (200 W): the first hour gets the trace's
        // mean (200 W) too, so the energy splits evenly between the hours.
        let m = vec![ManifestBuilder::new("c", 1, "n1")
            .span(ns(T0), ns(T0 + 2 * H))
            .gpu(Some(1.44e6))
            .trace(3_600_000, [("gpu0", vec![200.0f32])])
            .trace_start(ns(T0 + H))
            .build()];
        let r = combine(&m);
        let dir = tempfile::tempdir().unwrap();
        let file = csv(dir.path(), "i.csv", &format!("{T0},100\n{},300\n", T0 + H));
        let fp =
            carbon(&format!("intensity_file = {:?}", file.to_str().unwrap())).footprint(&r, &m);
        assert_eq!(fp.method, ProfileMethod::TracePartial);
        assert!((fp.trace_time_fraction - 0.5).abs() < 1e-9);
        // 0.2 kWh × 100 + 0.2 kWh × 300 = 80 g.
        assert!((fp.carbon.unwrap().operational_g - 80.0).abs() < 1e-6);
    }

    #[test]
    fn partitions_and_clusters_override_and_embodied_is_per_gpu_and_node_hour() {
        let f = carbon(
            "intensity_g_per_kwh = 400
             embodied_g_per_gpu_hour = 50
             embodied_g_per_node_hour = 100
             [partitions.gpu]
             intensity_g_per_kwh = 100
             [clusters.other]
             intensity_g_per_kwh = 10",
        );
        // 1 kWh in partition gpu: 100 g; 1 GPU × 2 h × 50 + 1 node × 2 h × 100 = 300 g.
        let (r, m) = job(3.6e6, true);
        let c = f.footprint(&r, &m).carbon.unwrap();
        assert!((c.operational_g - 100.0).abs() < 1e-9);
        assert_eq!(c.embodied_g, Some(300.0));
        assert!((c.total_g - 400.0).abs() < 1e-9);
        assert_eq!(c.pue.value, Some(1.0));
        let mut other = r.clone();
        other.cluster = "other".into();
        let c = f.footprint(&other, &m).carbon.unwrap();
        assert!((c.operational_g - 10.0).abs() < 1e-9);
    }

    /// A job drawing 1 kW for 2 h from `start` (Unix seconds), as one trace point (so that
    /// only the tariff splits it).
    fn kw_job(start: u64) -> (JobRecordFull, Vec<Manifest>) {
        let m = vec![ManifestBuilder::new("c", 1, "n1")
            .span(ns(start), ns(start + 2 * H))
            .partition("gpu")
            .gpu(Some(7.2e6))
            .trace(7_200_000, [("gpu0", vec![1000.0f32])])
            .build()];
        (combine(&m), m)
    }

    fn amount(f: &Factors, (r, m): (JobRecordFull, Vec<Manifest>)) -> f64 {
        let c = f.footprint(&r, &m).cost.unwrap();
        assert_eq!(c.missing_energy_fraction, 0.0, "{c:?}");
        c.amount
    }

    #[test]
    fn a_tariff_in_a_time_zone_follows_its_daylight_saving_time() {
        let day_night = "include_pue = false
             tariff = [{ from = \"07:00\", to = \"22:00\", price_per_kwh = 0.30 },
                       { from = \"22:00\", to = \"07:00\", price_per_kwh = 0.10 }]";
        let paris = cost(&format!("tariff_timezone = \"Europe/Paris\"\n{day_night}"));
        let fixed = cost(&format!("tariff_utc_offset = \"+01:00\"\n{day_night}"));
        // 2026-01-15 05:00-07:00 UTC = 06:00-08:00 in Paris (UTC+1): 1 kWh at 0.10, 1 at 0.30.
        let january = 1_768_453_200;
        assert!((amount(&paris, kw_job(january)) - 0.40).abs() < 1e-9);
        assert!((amount(&fixed, kw_job(january)) - 0.40).abs() < 1e-9);
        // 2026-07-15 05:00-07:00 UTC = 07:00-09:00 in Paris (UTC+2): 2 kWh at 0.30; a fixed
        // +01:00 clock would charge 06:00-08:00 instead.
        let july = 1_784_091_600;
        assert!((amount(&paris, kw_job(july)) - 0.60).abs() < 1e-9);
        assert!((amount(&fixed, kw_job(july)) - 0.40).abs() < 1e-9);

        // Spring forward, 2026-03-29: 02:00 CET becomes 03:00 CEST at 01:00 UTC. Windows
        // 00:00-03:00 at 0.10, then 0.30; the job 00:00-02:00 UTC is 01:00-02:00 CET (0.10),
        // then 03:00-04:00 CEST (0.30).
        let edge_at = |hhmm: &str| {
            cost(&format!(
                "include_pue = false
                 tariff_timezone = \"Europe/Paris\"
                 tariff = [{{ from = \"00:00\", to = \"{hhmm}\", price_per_kwh = 0.10 }},
                           {{ from = \"{hhmm}\", to = \"24:00\", price_per_kwh = 0.30 }}]"
            ))
        };
        let spring = 1_774_742_400; // 2026-03-29T00:00:00Z
        assert!((amount(&edge_at("03:00"), kw_job(spring)) - 0.40).abs() < 1e-9);
        // Fall back, 2026-10-25: 03:00 CEST becomes 02:00 CET at 01:00 UTC, so 02:30 comes
        // twice. Windows 00:00-02:30 at 0.10, then 0.30; the job 00:00-02:00 UTC: 02:00-02:30
        // CEST at 0.10, 02:30-03:00 CEST at 0.30, 02:00-02:30 CET at 0.10, 02:30-03:00 CET at
        // 0.30: 0.5 kWh each.
        let autumn = 1_792_886_400; // 2026-10-25T00:00:00Z
        assert!((amount(&edge_at("02:30"), kw_job(autumn)) - 0.40).abs() < 1e-9);
        let f = edge_at("02:30");
        let (r, m) = kw_job(autumn);
        let c = f.footprint(&r, &m).cost.unwrap();
        assert!(
            c.price.origin.ends_with(" Europe/Paris"),
            "{:?}",
            c.price.origin
        );
    }

    #[test]
    fn a_tariff_clock_is_one_of_an_offset_and_a_known_time_zone() {
        let windows = "tariff = [{ from = \"00:00\", to = \"24:00\", price_per_kwh = 0.1 }]";
        for (clock, key) in [
            (
                "tariff_utc_offset = \"+01:00\"\ntariff_timezone = \"Europe/Paris\"",
                "cost.tariff_timezone",
            ),
            (
                "tariff_timezone = \"Mars/Olympus_Mons\"",
                "cost.tariff_timezone",
            ),
            ("tariff_utc_offset = \"1h\"", "cost.tariff_utc_offset"),
        ] {
            let c: CostConfig = toml::from_str(&format!("{clock}\n{windows}")).unwrap();
            let (k, m) = c.validate("cost.", 0).unwrap_err();
            assert_eq!(k, key, "{clock}: {m}");
        }
    }

    #[test]
    fn a_tariff_prices_each_window() {
        // 00:00-01:00 at 0.10, 01:00-24:00 at 0.30: 0.1 kWh × 0.10 + 0.3 kWh × 0.30 = 0.10.
        let f = cost(
            "currency = \"EUR\"
             include_pue = false
             tariff = [{ from = \"01:00\", to = \"00:00\", price_per_kwh = 0.30 },
                       { from = \"00:00\", to = \"01:00\", price_per_kwh = 0.10 }]",
        );
        let (r, m) = job(1.44e6, true);
        let c = f.footprint(&r, &m).cost.unwrap();
        assert!((c.amount - 0.10).abs() < 1e-9, "{c:?}");
        assert_eq!(c.currency.as_deref(), Some("EUR"));
        assert!(c.pue.is_none());
        // In UTC+01:00 the job runs 01:00-03:00 local: all at 0.30, 0.4 kWh = 0.12.
        let f = cost(
            "tariff_utc_offset = \"+01:00\"
             tariff = [{ from = \"01:00\", to = \"00:00\", price_per_kwh = 0.30 },
                       { from = \"00:00\", to = \"01:00\", price_per_kwh = 0.10 }]",
        );
        assert!((f.footprint(&r, &m).cost.unwrap().amount - 0.12).abs() < 1e-9);
        // A window left out: that energy has no price, and says so.
        let f = cost("tariff = [{ from = \"00:00\", to = \"01:00\", price_per_kwh = 0.10 }]");
        let c = f.footprint(&r, &m).cost.unwrap();
        assert!((c.amount - 0.01).abs() < 1e-9);
        assert!((c.missing_energy_fraction - 0.75).abs() < 1e-9);
    }

    #[test]
    fn the_cost_includes_the_facility_pue_unless_told_not_to() {
        let carbon_c: CarbonConfig =
            toml::from_str("intensity_g_per_kwh = 100\npue = 1.25").unwrap();
        let cost_c: CostConfig = toml::from_str("price_per_kwh = 0.2").unwrap();
        let f = Factors::new(Some(&carbon_c), Some(&cost_c)).unwrap();
        let (r, m) = job(3.6e6, true);
        let fp = f.footprint(&r, &m);
        // 1 kWh × 1.25 × 0.2 = 0.25.
        assert!((fp.cost.as_ref().unwrap().amount - 0.25).abs() < 1e-9);
        assert_eq!(fp.cost.unwrap().pue.unwrap().value, Some(1.25));
        assert!((fp.carbon.unwrap().operational_g - 125.0).abs() < 1e-9);
    }

    #[test]
    fn pue_and_price_series_vary_interval_by_interval_too() {
        let dir = tempfile::tempdir().unwrap();
        let pue = csv(
            dir.path(),
            "pue.csv",
            &format!("{T0},1.0\n{},2.0\n", T0 + H),
        );
        let price = csv(dir.path(), "p.csv", &format!("{T0},0.1\n{},0.2\n", T0 + H));
        let carbon_c: CarbonConfig = toml::from_str(&format!(
            "intensity_g_per_kwh = 100\npue_file = {:?}",
            pue.to_str().unwrap()
        ))
        .unwrap();
        let cost_c: CostConfig = toml::from_str(&format!(
            "price_file = {:?}\ncurrency = \"CHF\"",
            price.to_str().unwrap()
        ))
        .unwrap();
        let f = Factors::new(Some(&carbon_c), Some(&cost_c)).unwrap();
        let (r, m) = job(1.44e6, true);
        let fp = f.footprint(&r, &m);
        // 0.1 kWh × PUE 1 × 100 + 0.3 kWh × PUE 2 × 100 = 70 g.
        assert!((fp.carbon.as_ref().unwrap().operational_g - 70.0).abs() < 1e-9);
        // 0.1 × 1 × 0.1 + 0.3 × 2 × 0.2 = 0.13.
        let cost = fp.cost.unwrap();
        assert!((cost.amount - 0.13).abs() < 1e-12, "{cost:?}");
        assert_eq!(cost.pue.unwrap().max, Some(2.0));
    }

    #[test]
    fn bad_configs_are_refused_with_their_key() {
        let c: CarbonConfig =
            toml::from_str("intensity_g_per_kwh = 1\nintensity_file = \"/x\"").unwrap();
        assert_eq!(
            c.validate("carbon.", 0).unwrap_err().0,
            "carbon.intensity_g_per_kwh"
        );
        let c: CarbonConfig = toml::from_str("[partitions.p]\npue = 0.5").unwrap();
        assert_eq!(
            c.validate("carbon.", 0).unwrap_err().0,
            "carbon.partitions.p.pue"
        );
        assert!(toml::from_str::<CarbonConfig>("intensity = 1").is_err());
        let c: CostConfig = toml::from_str(
            "tariff = [{ from = \"00:00\", to = \"12:00\", price_per_kwh = 1 },
                       { from = \"11:00\", to = \"13:00\", price_per_kwh = 1 }]",
        )
        .unwrap();
        assert!(c.validate("cost.", 0).unwrap_err().1.contains("overlap"));
    }

    /// A real HTTP server on a local port answering every GET with `body` (status 200, or
    /// 503 when `body` is empty); the request lines it got are in the returned list.
    fn serve(body: String) -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
        use std::io::{BufRead as _, BufReader, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/intensity", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                log.lock().unwrap().push(line.trim_end().to_owned());
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                        break;
                    }
                }
                let status = if body.is_empty() {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, seen)
    }

    #[test]
    fn an_http_endpoint_is_read_once_per_run_for_the_span_it_covers() {
        let body = format!(
            r#"{{"unit": "gCO2e/kWh", "data": [{{"time": "2026-01-01T00:00:00Z", "value": 200}},
                {{"time": {}, "value": 500}}]}}"#,
            T0 + H
        );
        let (url, seen) = serve(body);
        let f = carbon(&format!(
            "intensity_url = {url:?}\nintensity_source = \"local test grid\""
        ));
        let (r, m) = job(1.44e6, true);
        let c = f.footprint(&r, &m).carbon.unwrap();
        // As from the file: 0.1 kWh × 200 + 0.3 kWh × 500.
        assert!((c.operational_g - 170.0).abs() < 1e-6, "{c:?}");
        assert_eq!(c.intensity.origin, format!("url {url}"));
        // Asked for the job's span, from one step (3600 s) before its start.
        assert_eq!(
            seen.lock().unwrap().clone(),
            [format!(
                "GET /intensity?start={}&end={} HTTP/1.1",
                T0 - H,
                T0 + 2 * H
            )]
        );
        // The same span again: from the cache, no second request.
        let again = f.footprint(&r, &m).carbon.unwrap();
        assert_eq!(again, c);
        assert_eq!(seen.lock().unwrap().len(), 1);
        // A later job: one more request, over both.
        let later = vec![ManifestBuilder::new("c", 2, "n1")
            .span(ns(T0 + 3 * H), ns(T0 + 4 * H))
            .gpu(Some(3.6e6))
            .build()];
        let c = f.footprint(&combine(&later), &later).carbon.unwrap();
        // The last point (500) holds an hour: the job's hour is past it, all missing.
        assert_eq!(c.missing_energy_fraction, 1.0);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen[1],
            format!(
                "GET /intensity?start={}&end={} HTTP/1.1",
                T0 - H,
                T0 + 4 * H
            )
        );

        // An endpoint that fails: every figure says the intensity is missing, and why.
        let (url, _) = serve(String::new());
        let c = carbon(&format!("intensity_url = {url:?}"))
            .footprint(&r, &m)
            .carbon
            .unwrap();
        assert_eq!(c.missing_energy_fraction, 1.0);
        assert!(
            c.intensity.origin.contains("HTTP 503"),
            "{}",
            c.intensity.origin
        );
    }

    #[test]
    fn csv_series_read_times_as_unix_seconds_or_utc_dates() {
        let s = parse_csv(
            "time,gco2e_per_kwh\n2026-01-01T01:00:00Z,250 # comment\n1767225600,200\n",
            3600,
        )
        .unwrap();
        assert_eq!(s.points, [(ns(T0), 200.0), (ns(T0 + H), 250.0)]);
        assert!(parse_csv("1,2\n1,3\n", 60)
            .unwrap_err()
            .contains("two values"));
        assert!(parse_csv("1,-2\n", 60).unwrap_err().contains("line 1"));
        // A value holds until the next point or max_step, whichever comes first.
        assert_eq!(s.at(ns(T0) - 1), (None, ns(T0)));
        assert_eq!(s.at(ns(T0) + 5), (Some(200.0), ns(T0 + H)));
        assert_eq!(s.at(ns(T0 + 2 * H)), (None, u64::MAX));
    }
}
