//! The sacct record: one short `ergon1 key=value …` segment in a sacct comment field.
//!
//! The accounting tool stores each job's energy in a Slurm comment field (`AdminComment` by
//! default) with `sacctmgr modify job`, so that `sacct -o JobID,AdminComment` shows it.
//! Three facts about Slurm 22.05 shape the format:
//!
//! - sacctmgr lowercases the value, so the encoding is lowercase only and reads back
//!   unchanged;
//! - a `"` truncates the value, so the encoding has no quotes (it is plain ASCII:
//!   letters, digits, `=`, `.` and spaces);
//! - other tools (Princeton's jobstats) write the same field, so ours is one segment that
//!   is merged in without touching any other byte.
//!
//! # Format
//!
//! ```text
//! ergon1 e=<J> gpu=<J> cpu=<J> dram=<J> [other=<J>] avgw=<W> peakw=<W> ngpu=<n> nodes=<n> cov=<0.000>
//!        [gcov=<0.000>] [ccov=<0.000>] [dcov=<0.000>] [gunk=<n>] [errj=<J>] [sluid=<id>]
//!        [nexp=<n>] [co2g=<g>] [co2m=<0.000>] [cost=<amount>] [costm=<0.000>] [cur=<code>]
//!        [gidle=<J>] [gutil=<0.0>] [gthr=<s>] [xid=<n>] [wall=<J>] h=<hex>
//! ```
//!
//! Energies are whole joules, powers watts with one decimal, coverage a fraction with three
//! decimals, `h` the first 12 hex digits of the job's content hash. The keys in brackets are
//! written only when they apply (the field of [`JobRecord`] is set): `other` energy in no
//! component; the coverage of the job's GPUs (`gcov`), CPU packages (`ccov`) and DRAM (`dcov`);
//! the number of nodes on which the job's GPUs could not be known (`gunk`: the GPU energy there
//! is unknown, and `gpu` holds only what was measured on the other nodes); the largest error of
//! the estimated part of `e` (`errj`, joules: the true energy is within `e ± errj` as far as
//! the estimates go); Slurm's cluster-unique job id (`sluid`); the number of nodes the job ran on
//! when fewer reported (`nexp`: the record is incomplete, `nodes` of `nexp` nodes are in it);
//! the job's CO2e in grams with one decimal (`co2g`, operational plus embodied) and the fraction
//! of its energy whose carbon intensity or PUE was unknown (`co2m`, that part is not in `co2g`);
//! its energy cost with four decimals (`cost`), the fraction of its energy without a price
//! (`costm`) and the cost's currency code, lowercased (`cur`). The factors behind `co2g` and
//! `cost` are in the job-records database (`ergon report`), not here. From the GPUs'
//! efficiency figures (manifest schema 6): the energy of the allocated GPUs that sat idle
//! (`gidle`, whole joules), the average SM utilisation of the job's GPUs in percent with one
//! decimal (`gutil`, time-weighted over GPUs and nodes), the seconds their clocks were
//! throttled, summed over GPUs and reasons, with one decimal (`gthr`), and the number of Xid
//! errors (`xid`); each written only where some GPU reported it. The job's energy at the wall
//! (`wall`, whole joules: its components plus its part of the rest of the node, from the node
//! meters, manifest schema 6), written only when every node of the job had a meter.
//! Decoding ignores keys it does not
//! know (a later `ergon1` writer may add some, and readers from before these optional keys
//! ignore them) and fails on a missing required key, naming it. A change that older readers
//! would misread becomes `ergon2`.
//!
//! # Size
//!
//! An encoded record is at most [`MAX_ENCODED_LEN`] bytes whatever its values (powers above
//! [`MAX_POWER_W`] are written as that, a SLUID is at most [`MAX_SLUID_LEN`] characters); a
//! typical one is 110-190 bytes. The field it goes into is shared with other tools, and Slurm
//! caps a user's `Comment` at 1024 characters.
//!
//! # Segments in a field
//!
//! An ergon segment starts with `ergon1 ` either at the start of the field or right after
//! `"; "`, and runs to the next `;` or the end of the field. [`merge_into_field`] replaces
//! the segment if there is one (even one that no longer decodes: it is ours) and otherwise
//! appends `"; "` + segment to foreign content, or writes the segment alone into an empty
//! field. Everything else in the field is left byte for byte as it was.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The tag that starts every segment of this format.
const TAG: &str = "ergon1";

/// Length of the hash prefix stored in the record.
pub const HASH_PREFIX_LEN: usize = 12;

/// The longest encoded record: every key present, every number at its largest (checked by a
/// test).
pub const MAX_ENCODED_LEN: usize = 571;

/// Throttle seconds above this are written as this.
pub const MAX_THROTTLE_S: f64 = 1e9;

/// CO2e above this (a million tonnes) is written as this.
pub const MAX_CO2E_G: f64 = 1e12;

/// A cost above this is written as this.
pub const MAX_COST: f64 = 1e12;

/// The longest currency code a record carries.
pub const MAX_CURRENCY_LEN: usize = 8;

/// Powers above this (a terawatt: no job draws that; a broken counter can) are written as this.
pub const MAX_POWER_W: f64 = 1e12;

/// The longest SLUID a record carries; a longer one (or one with other characters than
/// lowercase letters and digits) is left out.
pub const MAX_SLUID_LEN: usize = 32;

/// A job's energy as stored in sacct: the job's totals across all its nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Total energy, joules (`e`).
    pub energy_j: u64,
    /// GPU energy, joules (`gpu`).
    pub gpu_j: u64,
    /// CPU package energy, joules (`cpu`).
    pub cpu_j: u64,
    /// DRAM energy, joules (`dram`).
    pub dram_j: u64,
    /// Energy in no component above (e.g. a node-level meter), joules (`other`); written
    /// only when set.
    pub other_j: Option<u64>,
    /// Average power, watts, kept to one decimal (`avgw`).
    pub avg_w: f64,
    /// Peak power, watts, kept to one decimal (`peakw`).
    pub peak_w: f64,
    /// Number of GPUs allocated, all nodes (`ngpu`).
    pub gpus: u32,
    /// Number of nodes (`nodes`).
    pub nodes: u32,
    /// Fraction of the job covered by readings, `0..=1`, kept to three decimals (`cov`).
    pub coverage: f64,
    /// First 12 lowercase hex digits of the job's content hash (`h`); see
    /// [`JobRecord::short_hash`].
    pub hash: String,
    /// Coverage of the job's GPUs, `0..=1`, three decimals (`gcov`); `None`: not stated (the
    /// job has no GPU, or coverage is complete, or the manifests predate per-component
    /// coverage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage_gpu: Option<f64>,
    /// Coverage of the job's CPU packages (`ccov`), as `coverage_gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage_cpu: Option<f64>,
    /// Coverage of the job's DRAM (`dcov`), as `coverage_gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage_dram: Option<f64>,
    /// Nodes on which the job's GPUs could not be known (`gunk`, written when not 0): the GPU
    /// energy there is unknown, not 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gpus_unknown_nodes: u32,
    /// The largest error of the estimated part of the energy, whole joules, rounded up
    /// (`errj`); `None`: nothing estimated with a bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_bound_j: Option<u64>,
    /// Slurm's cluster-unique job id, lowercase (`sluid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sluid: Option<String>,
    /// The number of nodes the job ran on, written only when fewer reported (`nexp`): the
    /// record is then incomplete, its figures those of `nodes` of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_expected: Option<u32>,
    /// CO2e, grams, one decimal (`co2g`); `None`: not computed (no `[carbon]` config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub co2e_g: Option<f64>,
    /// The fraction of the energy whose intensity or PUE was unknown (`co2m`), three decimals;
    /// written when not 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub co2e_missing: Option<f64>,
    /// Energy cost, four decimals (`cost`); `None`: not computed (no `[cost]` config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// The fraction of the energy without a price (`costm`); written when not 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_missing: Option<f64>,
    /// The cost's currency code, lowercase (`cur`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Energy of the job's allocated GPUs that sat idle, whole joules (`gidle`); `None`: no
    /// GPU's utilisation was sampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_idle_j: Option<u64>,
    /// Average SM utilisation of the job's GPUs, %, one decimal (`gutil`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_util_pct: Option<f64>,
    /// Seconds the job's GPUs' clocks were throttled, summed over GPUs and reasons, one
    /// decimal (`gthr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_throttle_s: Option<f64>,
    /// Xid errors on the job's GPUs (`xid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid_events: Option<u32>,
    /// The job's energy at the wall, whole joules (`wall`); `None`: not every node had a meter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_j: Option<u64>,
}

fn normalize_currency(c: &str) -> Option<String> {
    let c = c.to_ascii_lowercase();
    (!c.is_empty() && c.len() <= MAX_CURRENCY_LEN && c.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some(c)
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A SLUID as the record carries it: lowercase, letters and digits only, at most
/// [`MAX_SLUID_LEN`]; anything else is left out.
fn normalize_sluid(sluid: &str) -> Option<String> {
    let s = sluid.trim().to_ascii_lowercase();
    (!s.is_empty()
        && s.len() <= MAX_SLUID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
    .then_some(s)
}

fn normalize_fraction(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        round_to(x.clamp(0.0, 1.0), 3)
    }
}

/// Why a segment could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The text does not start with `ergon1 `.
    #[error("not an ergon record: expected it to start with \"ergon1 \", found {0:?}")]
    NotErgon(String),
    /// A required key is absent.
    #[error("ergon record is missing the required key {0:?}; it was truncated or written by an incompatible ergon")]
    MissingKey(&'static str),
    /// A key appears twice.
    #[error("ergon record has the key {0:?} twice")]
    DuplicateKey(String),
    /// A token that is not `key=value`.
    #[error("ergon record has the malformed token {0:?}; expected key=value")]
    MalformedToken(String),
    /// A value of the wrong form for its key.
    #[error("ergon record has an invalid value for {key:?}: {value:?} ({expected})")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// The value found.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
}

/// Round a finite, non-negative float to `decimals` places exactly as encoding does;
/// anything else becomes 0.
fn round_to(x: f64, decimals: usize) -> f64 {
    if !x.is_finite() || x <= 0.0 {
        return 0.0;
    }
    format!("{x:.decimals$}").parse().unwrap_or(0.0)
}

fn normalize_hash(hash: &str) -> String {
    hash.chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .take(HASH_PREFIX_LEN)
        .collect()
}

impl JobRecord {
    /// The record as [`JobRecord::decode`] will give it back from [`JobRecord::encode`]:
    /// `avg_w`/`peak_w` rounded to one decimal (as `format!` rounds) and capped at
    /// [`MAX_POWER_W`], the coverages rounded to three and clamped to `0..=1` (NaN to 0),
    /// negative or non-finite powers set to 0, `hash` reduced to its first 12 hex digits,
    /// lowercased, and a SLUID lowercased (left out if it is not letters and digits, or longer
    /// than [`MAX_SLUID_LEN`]).
    pub fn normalized(&self) -> JobRecord {
        let power = |w: f64| round_to(if w > MAX_POWER_W { MAX_POWER_W } else { w }, 1);
        JobRecord {
            avg_w: power(self.avg_w),
            peak_w: power(self.peak_w),
            coverage: normalize_fraction(self.coverage),
            hash: normalize_hash(&self.hash),
            coverage_gpu: self.coverage_gpu.map(normalize_fraction),
            coverage_cpu: self.coverage_cpu.map(normalize_fraction),
            coverage_dram: self.coverage_dram.map(normalize_fraction),
            sluid: self.sluid.as_deref().and_then(normalize_sluid),
            co2e_g: self
                .co2e_g
                .map(|g| round_to(if g > MAX_CO2E_G { MAX_CO2E_G } else { g }, 1)),
            co2e_missing: self.co2e_missing.map(normalize_fraction),
            cost: self
                .cost
                .map(|c| round_to(if c > MAX_COST { MAX_COST } else { c }, 4)),
            cost_missing: self.cost_missing.map(normalize_fraction),
            currency: self.currency.as_deref().and_then(normalize_currency),
            gpu_util_pct: self.gpu_util_pct.map(|u| round_to(u.clamp(0.0, 100.0), 1)),
            gpu_throttle_s: self
                .gpu_throttle_s
                .map(|s| round_to(s.min(MAX_THROTTLE_S), 1)),
            ..self.clone()
        }
    }

    /// The 12-digit prefix stored in `h` for a manifest or job content hash such as
    /// `"sha256:9f86d081884c…"`.
    pub fn short_hash(content_hash: &str) -> String {
        let hex = content_hash.strip_prefix("sha256:").unwrap_or(content_hash);
        normalize_hash(hex)
    }

    /// The segment text. Always lowercase ASCII without `"` or `;`; see the
    /// [module documentation](self#format) and [`JobRecord::normalized`] for the rounding.
    pub fn encode(&self) -> String {
        let r = self.normalized();
        let mut out = String::with_capacity(128);
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "{TAG} e={} gpu={} cpu={} dram={}",
            r.energy_j, r.gpu_j, r.cpu_j, r.dram_j
        );
        if let Some(other) = r.other_j {
            let _ = write!(out, " other={other}");
        }
        let _ = write!(
            out,
            " avgw={:.1} peakw={:.1} ngpu={} nodes={} cov={:.3}",
            r.avg_w, r.peak_w, r.gpus, r.nodes, r.coverage
        );
        for (key, value) in [
            ("gcov", r.coverage_gpu),
            ("ccov", r.coverage_cpu),
            ("dcov", r.coverage_dram),
        ] {
            if let Some(v) = value {
                let _ = write!(out, " {key}={v:.3}");
            }
        }
        if r.gpus_unknown_nodes > 0 {
            let _ = write!(out, " gunk={}", r.gpus_unknown_nodes);
        }
        if let Some(bound) = r.estimate_bound_j {
            let _ = write!(out, " errj={bound}");
        }
        if let Some(sluid) = &r.sluid {
            let _ = write!(out, " sluid={sluid}");
        }
        if let Some(n) = r.nodes_expected {
            let _ = write!(out, " nexp={n}");
        }
        if let Some(g) = r.co2e_g {
            let _ = write!(out, " co2g={g:.1}");
        }
        if let Some(m) = r.co2e_missing {
            let _ = write!(out, " co2m={m:.3}");
        }
        if let Some(c) = r.cost {
            let _ = write!(out, " cost={c:.4}");
        }
        if let Some(m) = r.cost_missing {
            let _ = write!(out, " costm={m:.3}");
        }
        if let Some(c) = &r.currency {
            let _ = write!(out, " cur={c}");
        }
        if let Some(j) = r.gpu_idle_j {
            let _ = write!(out, " gidle={j}");
        }
        if let Some(u) = r.gpu_util_pct {
            let _ = write!(out, " gutil={u:.1}");
        }
        if let Some(s) = r.gpu_throttle_s {
            let _ = write!(out, " gthr={s:.1}");
        }
        if let Some(n) = r.xid_events {
            let _ = write!(out, " xid={n}");
        }
        if let Some(j) = r.wall_j {
            let _ = write!(out, " wall={j}");
        }
        let _ = write!(out, " h={}", r.hash);
        out
    }

    /// Parse a segment produced by [`JobRecord::encode`] (surrounding whitespace allowed).
    /// Unknown keys are ignored.
    pub fn decode(text: &str) -> Result<JobRecord, RecordError> {
        let mut tokens = text.split_ascii_whitespace();
        if tokens.next() != Some(TAG) {
            return Err(RecordError::NotErgon(text.chars().take(40).collect()));
        }
        const KEYS: [&str; 28] = [
            "e", "gpu", "cpu", "dram", "other", "avgw", "peakw", "ngpu", "nodes", "cov", "h",
            "gcov", "ccov", "dcov", "gunk", "errj", "sluid", "nexp", "co2g", "co2m", "cost",
            "costm", "cur", "gidle", "gutil", "gthr", "xid", "wall",
        ];
        let mut values: [Option<&str>; 28] = [None; 28];
        for token in tokens {
            let (key, value) = token
                .split_once('=')
                .ok_or_else(|| RecordError::MalformedToken(token.to_owned()))?;
            if let Some(i) = KEYS.iter().position(|k| *k == key) {
                if values[i].replace(value).is_some() {
                    return Err(RecordError::DuplicateKey(key.to_owned()));
                }
            }
        }
        let get = |i: usize| values[i].ok_or(RecordError::MissingKey(KEYS[i]));
        let fraction = |i: usize| -> Result<Option<f64>, RecordError> {
            let Some(v) = values[i] else {
                return Ok(None);
            };
            let x = parse_decimal(KEYS[i], v)?;
            if x > 1.0 {
                return Err(RecordError::InvalidValue {
                    key: KEYS[i],
                    value: v.to_owned(),
                    expected: "a fraction between 0 and 1",
                });
            }
            Ok(Some(x))
        };
        let record = JobRecord {
            energy_j: parse_int(KEYS[0], get(0)?)?,
            gpu_j: parse_int(KEYS[1], get(1)?)?,
            cpu_j: parse_int(KEYS[2], get(2)?)?,
            dram_j: parse_int(KEYS[3], get(3)?)?,
            other_j: values[4].map(|v| parse_int(KEYS[4], v)).transpose()?,
            avg_w: parse_decimal(KEYS[5], get(5)?)?,
            peak_w: parse_decimal(KEYS[6], get(6)?)?,
            gpus: parse_int(KEYS[7], get(7)?)?,
            nodes: parse_int(KEYS[8], get(8)?)?,
            coverage: fraction(9)?.ok_or(RecordError::MissingKey(KEYS[9]))?,
            hash: parse_hash(KEYS[10], get(10)?)?,
            coverage_gpu: fraction(11)?,
            coverage_cpu: fraction(12)?,
            coverage_dram: fraction(13)?,
            gpus_unknown_nodes: values[14]
                .map(|v| parse_int(KEYS[14], v))
                .transpose()?
                .unwrap_or(0),
            estimate_bound_j: values[15].map(|v| parse_int(KEYS[15], v)).transpose()?,
            sluid: values[16]
                .map(|v| {
                    normalize_sluid(v)
                        .filter(|s| s == v)
                        .ok_or_else(|| RecordError::InvalidValue {
                            key: "sluid",
                            value: v.to_owned(),
                            expected: "lowercase letters and digits",
                        })
                })
                .transpose()?,
            nodes_expected: values[17].map(|v| parse_int(KEYS[17], v)).transpose()?,
            co2e_g: values[18].map(|v| parse_decimal(KEYS[18], v)).transpose()?,
            co2e_missing: fraction(19)?,
            cost: values[20].map(|v| parse_decimal(KEYS[20], v)).transpose()?,
            cost_missing: fraction(21)?,
            currency: values[22]
                .map(|v| {
                    normalize_currency(v).filter(|c| c == v).ok_or_else(|| {
                        RecordError::InvalidValue {
                            key: "cur",
                            value: v.to_owned(),
                            expected: "a currency code: up to 8 lowercase letters and digits",
                        }
                    })
                })
                .transpose()?,
            gpu_idle_j: values[23].map(|v| parse_int(KEYS[23], v)).transpose()?,
            gpu_util_pct: values[24].map(|v| parse_decimal(KEYS[24], v)).transpose()?,
            gpu_throttle_s: values[25].map(|v| parse_decimal(KEYS[25], v)).transpose()?,
            xid_events: values[26].map(|v| parse_int(KEYS[26], v)).transpose()?,
            wall_j: values[27].map(|v| parse_int(KEYS[27], v)).transpose()?,
        };
        Ok(record)
    }
}

fn parse_int<T: std::str::FromStr>(key: &'static str, value: &str) -> Result<T, RecordError> {
    let invalid = || RecordError::InvalidValue {
        key,
        value: value.to_owned(),
        expected: "a whole number",
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    value.parse().map_err(|_| invalid())
}

fn parse_decimal(key: &'static str, value: &str) -> Result<f64, RecordError> {
    let invalid = || RecordError::InvalidValue {
        key,
        value: value.to_owned(),
        expected: "a decimal number such as 12.5",
    };
    let (int, frac) = value.split_once('.').unwrap_or((value, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) {
        return Err(invalid());
    }
    value
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(invalid)
}

fn parse_hash(key: &'static str, value: &str) -> Result<String, RecordError> {
    if value.len() <= 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(value.to_owned())
    } else {
        Err(RecordError::InvalidValue {
            key,
            value: value.to_owned(),
            expected: "lowercase hex digits",
        })
    }
}

/// Byte ranges of the ergon segments in `field`, in order.
fn segments(field: &str) -> Vec<std::ops::Range<usize>> {
    let prefix = "ergon1 ";
    let mut out = Vec::new();
    let mut search_from = 0;
    while let Some(offset) = field[search_from..].find(prefix) {
        let start = search_from + offset;
        let at_boundary = start == 0 || field[..start].ends_with("; ");
        if at_boundary {
            let end = field[start..].find(';').map_or(field.len(), |i| start + i);
            out.push(start..end);
            search_from = end;
        } else {
            search_from = start + 1;
        }
    }
    out
}

/// Decode the ergon segment in a comment field, if there is one.
///
/// `None`: the field holds no ergon segment. `Some(Err(_))`: it holds one that does not
/// decode (damaged, or written by an incompatible version).
pub fn find_in_field(field: &str) -> Option<Result<JobRecord, RecordError>> {
    segments(field)
        .first()
        .map(|r| JobRecord::decode(&field[r.clone()]))
}

/// Put `rec` into a comment field's current value, returning the new value.
///
/// Replaces the existing ergon segment in place (and drops any further ones), or appends
/// `"; "` + segment after foreign content, or gives the segment alone for an empty field.
/// Foreign content is kept byte for byte. Note that sacctmgr will still lowercase the
/// whole field, foreign content included, and cut it at a `"`: the caller must check the
/// read-back.
pub fn merge_into_field(existing: &str, rec: &JobRecord) -> String {
    let segment = rec.encode();
    let found = segments(existing);
    let Some(first) = found.first() else {
        return if existing.is_empty() {
            segment
        } else {
            format!("{existing}; {segment}")
        };
    };
    let mut out = String::with_capacity(existing.len() + segment.len());
    out.push_str(&existing[..first.start]);
    out.push_str(&segment);
    let mut copied_to = first.end;
    for extra in &found[1..] {
        // Every segment after the first follows "; ", which goes with it.
        out.push_str(&existing[copied_to..extra.start - 2]);
        copied_to = extra.end;
    }
    out.push_str(&existing[copied_to..]);
    out
}

/// A comment field's value with every ergon segment removed, along with the separator that
/// joined it to foreign content. For a field produced by [`merge_into_field`] from foreign
/// content `f`, this gives `f` back exactly.
pub fn strip_from_field(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut copied_to = 0;
    for seg in segments(field) {
        if seg.start == 0 {
            // Leading segment: drop it and the "; " or ";" that joins it to what follows.
            let rest = &field[seg.end..];
            let skip = if rest.starts_with("; ") {
                2
            } else {
                usize::from(rest.starts_with(';'))
            };
            copied_to = seg.end + skip;
        } else {
            out.push_str(&field[copied_to..seg.start - 2]);
            copied_to = seg.end;
        }
    }
    out.push_str(&field[copied_to..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JobRecord {
        JobRecord {
            energy_j: 123_456,
            gpu_j: 100_000,
            cpu_j: 20_000,
            dram_j: 3_456,
            other_j: None,
            avg_w: 412.3,
            peak_w: 980.1,
            gpus: 4,
            nodes: 1,
            coverage: 0.998,
            hash: "9f86d081884c".into(),
            ..JobRecord::default()
        }
    }

    /// A job with a GPU node whose GPUs were unknown, a partly covered CPU and an estimate.
    fn schema4() -> JobRecord {
        JobRecord {
            coverage: 0.0,
            coverage_gpu: Some(0.5),
            coverage_cpu: Some(0.905),
            coverage_dram: None,
            gpus_unknown_nodes: 1,
            estimate_bound_j: Some(1234),
            sluid: Some("s2gxm9475ceh00".into()),
            ..sample()
        }
    }

    #[test]
    fn optional_keys_are_written_when_set_and_read_back() {
        assert_eq!(
            schema4().encode(),
            "ergon1 e=123456 gpu=100000 cpu=20000 dram=3456 avgw=412.3 peakw=980.1 ngpu=4 nodes=1 cov=0.000 gcov=0.500 ccov=0.905 gunk=1 errj=1234 sluid=s2gxm9475ceh00 h=9f86d081884c"
        );
        assert_eq!(JobRecord::decode(&schema4().encode()), Ok(schema4()));
        // A record without them (written before they existed) reads with none set.
        let old = "ergon1 e=1 gpu=0 cpu=1 dram=0 avgw=0.1 peakw=0.2 ngpu=0 nodes=1 cov=1.000 h=ab";
        let r = JobRecord::decode(old).unwrap();
        assert_eq!(
            (
                r.coverage_gpu,
                r.gpus_unknown_nodes,
                r.estimate_bound_j,
                r.sluid
            ),
            (None, 0, None, None)
        );
        // What an older reader does with a new record: it keeps the keys it knows (its
        // decoder ignores the others), so its required keys must all be there, unchanged.
        let new = schema4().encode();
        let known_to_old: Vec<&str> = new
            .split(' ')
            .filter(|t| {
                ["gcov=", "ccov=", "dcov=", "gunk=", "errj=", "sluid="]
                    .iter()
                    .all(|k| !t.starts_with(k))
            })
            .collect();
        let old_view = JobRecord::decode(&known_to_old.join(" ")).unwrap();
        assert_eq!(
            old_view,
            JobRecord {
                coverage_gpu: None,
                coverage_cpu: None,
                gpus_unknown_nodes: 0,
                estimate_bound_j: None,
                sluid: None,
                ..schema4()
            }
        );
    }

    #[test]
    fn an_incomplete_job_says_how_many_nodes_it_ran_on() {
        let r = JobRecord {
            nodes: 2,
            nodes_expected: Some(3),
            ..sample()
        };
        let text = r.encode();
        assert!(
            text.contains(" nodes=2 ") && text.contains(" nexp=3 "),
            "{text}"
        );
        assert_eq!(JobRecord::decode(&text), Ok(r));
        assert!(!sample().encode().contains("nexp="));
        assert!(JobRecord::decode(&text.replace("nexp=3", "nexp=x")).is_err());
    }

    #[test]
    fn optional_keys_are_checked() {
        let enc = schema4().encode();
        for (from, to) in [
            ("gcov=0.500", "gcov=1.5"),
            ("gcov=0.500", "gcov=x"),
            ("gunk=1", "gunk=-1"),
            ("errj=1234", "errj=1.5"),
            ("sluid=s2gxm9475ceh00", "sluid=S2G"),
            ("sluid=s2gxm9475ceh00", "sluid=a-b"),
        ] {
            let bad = enc.replace(from, to);
            assert!(JobRecord::decode(&bad).is_err(), "{bad}");
        }
        // A SLUID that the record cannot carry is left out, not mangled.
        for bad in ["S2G-XM", "s2g xm", "a;b", &"a".repeat(MAX_SLUID_LEN + 1)] {
            let r = JobRecord {
                sluid: Some(bad.to_string()),
                ..sample()
            };
            assert_eq!(r.normalized().sluid, None, "{bad}");
            assert!(!r.encode().contains("sluid="));
        }
        let r = JobRecord {
            sluid: Some("S2GXM9475CEH00".into()),
            ..sample()
        };
        assert!(r.encode().contains(" sluid=s2gxm9475ceh00 "));
    }

    #[test]
    fn the_longest_record_fits_the_budget() {
        let longest = JobRecord {
            energy_j: u64::MAX,
            gpu_j: u64::MAX,
            cpu_j: u64::MAX,
            dram_j: u64::MAX,
            other_j: Some(u64::MAX),
            avg_w: f64::MAX,
            peak_w: MAX_POWER_W * 2.0,
            gpus: u32::MAX,
            nodes: u32::MAX,
            coverage: 0.123,
            hash: "f".repeat(64),
            coverage_gpu: Some(0.123),
            coverage_cpu: Some(0.123),
            coverage_dram: Some(0.123),
            gpus_unknown_nodes: u32::MAX,
            estimate_bound_j: Some(u64::MAX),
            sluid: Some("z".repeat(MAX_SLUID_LEN)),
            nodes_expected: Some(u32::MAX),
            co2e_g: Some(f64::MAX),
            co2e_missing: Some(0.123),
            cost: Some(f64::MAX),
            cost_missing: Some(0.123),
            currency: Some("z".repeat(MAX_CURRENCY_LEN)),
            gpu_idle_j: Some(u64::MAX),
            gpu_util_pct: Some(f64::MAX),
            gpu_throttle_s: Some(f64::MAX),
            xid_events: Some(u32::MAX),
            wall_j: Some(u64::MAX),
        };
        let text = longest.encode();
        assert!(
            text.len() <= MAX_ENCODED_LEN,
            "{} bytes: {text}",
            text.len()
        );
        assert!(text.contains("avgw=1000000000000.0 peakw=1000000000000.0"));
        assert_eq!(JobRecord::decode(&text), Ok(longest.normalized()));
        // A typical record with every optional key.
        assert!(schema4().encode().len() < 200);
    }

    #[test]
    fn gpu_efficiency_keys_are_written_when_set_and_read_back() {
        let r = JobRecord {
            gpu_idle_j: Some(412_000),
            gpu_util_pct: Some(37.26),
            gpu_throttle_s: Some(12.54),
            xid_events: Some(1),
            ..sample()
        };
        let text = r.encode();
        assert!(
            text.contains(" gidle=412000 gutil=37.3 gthr=12.5 xid=1 h="),
            "{text}"
        );
        let walled = JobRecord {
            wall_j: Some(130_001),
            ..r.clone()
        };
        let w = walled.encode();
        assert!(w.contains(" xid=1 wall=130001 h="), "{w}");
        assert_eq!(JobRecord::decode(&w), Ok(walled.normalized()));
        assert!(!text.contains("wall="), "{text}");
        assert_eq!(JobRecord::decode(&text), Ok(r.normalized()));
        let plain = sample().encode();
        for key in ["gidle=", "gutil=", "gthr=", "xid="] {
            assert!(!plain.contains(key), "{plain}");
        }
    }

    #[test]
    fn co2e_and_cost_keys_are_written_when_set_and_read_back() {
        let r = JobRecord {
            co2e_g: Some(1234.56),
            co2e_missing: Some(0.25),
            cost: Some(0.123_456),
            currency: Some("EUR".into()),
            ..sample()
        };
        let text = r.encode();
        assert!(
            text.ends_with(
                " nodes=1 cov=0.998 co2g=1234.6 co2m=0.250 cost=0.1235 cur=eur h=9f86d081884c"
            ),
            "{text}"
        );
        let back = JobRecord::decode(&text).unwrap();
        assert_eq!(back, r.normalized());
        assert_eq!((back.co2e_g, back.cost), (Some(1234.6), Some(0.1235)));
        assert_eq!(back.currency.as_deref(), Some("eur"));
        // Without them, nothing is written: readers before these keys see the record as before.
        assert!(!sample().encode().contains("co2"));
        assert!(JobRecord::decode(
            "ergon1 e=1 gpu=0 cpu=0 dram=0 avgw=0.0 peakw=0.0 ngpu=0 nodes=1 cov=1.000 co2m=2 h=ab"
        )
        .is_err());
    }

    #[test]
    fn encodes_the_documented_format() {
        assert_eq!(
            sample().encode(),
            "ergon1 e=123456 gpu=100000 cpu=20000 dram=3456 avgw=412.3 peakw=980.1 ngpu=4 nodes=1 cov=0.998 h=9f86d081884c"
        );
        let with_other = JobRecord {
            other_j: Some(7),
            ..sample()
        };
        assert!(with_other.encode().contains(" dram=3456 other=7 avgw="));
    }

    #[test]
    fn decode_reverses_encode() {
        assert_eq!(JobRecord::decode(&sample().encode()), Ok(sample()));
        let with_other = JobRecord {
            other_j: Some(7),
            ..sample()
        };
        assert_eq!(JobRecord::decode(&with_other.encode()), Ok(with_other));
    }

    #[test]
    fn decode_ignores_unknown_keys_and_names_missing_ones() {
        let text = sample().encode() + " future=abc";
        assert_eq!(JobRecord::decode(&text), Ok(sample()));
        let missing = sample().encode().replace(" peakw=980.1", "");
        assert_eq!(
            JobRecord::decode(&missing),
            Err(RecordError::MissingKey("peakw"))
        );
        let err = JobRecord::decode(&missing).unwrap_err().to_string();
        assert!(err.contains("peakw"), "{err}");
    }

    #[test]
    fn decode_rejects_bad_values() {
        let enc = sample().encode();
        for (from, to) in [
            ("e=123456", "e=-1"),
            ("e=123456", "e=1.5"),
            ("avgw=412.3", "avgw=nan"),
            ("avgw=412.3", "avgw=inf"),
            ("avgw=412.3", "avgw=1e3"),
            ("cov=0.998", "cov=1.5"),
            ("h=9f86d081884c", "h=9F86"),
            ("ngpu=4", "ngpu=4294967296"),
        ] {
            let bad = enc.replace(from, to);
            assert!(JobRecord::decode(&bad).is_err(), "{bad}");
        }
        assert!(matches!(
            JobRecord::decode(&(enc.clone() + " e=1")),
            Err(RecordError::DuplicateKey(_))
        ));
        assert!(matches!(
            JobRecord::decode(&(enc.clone() + " junk")),
            Err(RecordError::MalformedToken(_))
        ));
        assert!(matches!(
            JobRecord::decode("ergon2 e=1"),
            Err(RecordError::NotErgon(_))
        ));
    }

    #[test]
    fn normalisation_rounds_clamps_and_trims() {
        let r = JobRecord {
            avg_w: 412.34,
            peak_w: f64::NAN,
            coverage: 1.7,
            hash: "sha256:9F86D081884C7D65".into(),
            ..sample()
        };
        let n = r.normalized();
        assert_eq!((n.avg_w, n.peak_w, n.coverage), (412.3, 0.0, 1.0));
        // The "a" of "sha" is a hex digit too: short_hash strips the prefix, normalized does not.
        assert_eq!(n.hash, "a2569f86d081");
        assert_eq!(
            JobRecord::short_hash("sha256:9F86D081884C7D65"),
            "9f86d081884c"
        );
        assert_eq!(JobRecord::decode(&r.encode()), Ok(n));
    }

    #[test]
    fn merge_appends_replaces_and_strips() {
        let seg = sample().encode();
        assert_eq!(merge_into_field("", &sample()), seg);
        let jobstats = "JS1:H4sIAAAAAAAAA+2Ty==";
        let merged = merge_into_field(jobstats, &sample());
        assert_eq!(merged, format!("{jobstats}; {seg}"));
        assert_eq!(strip_from_field(&merged), jobstats);
        let newer = JobRecord {
            energy_j: 1,
            ..sample()
        };
        let again = merge_into_field(&merged, &newer);
        assert_eq!(again, format!("{jobstats}; {}", newer.encode()));
        assert_eq!(find_in_field(&again), Some(Ok(newer.clone())));
        // A segment at the start, followed by foreign content, is replaced in place.
        let field = format!("{seg}; other tool");
        assert_eq!(
            merge_into_field(&field, &newer),
            format!("{}; other tool", newer.encode())
        );
        assert_eq!(strip_from_field(&field), "other tool");
        // Extra segments are dropped with their separator.
        let twice = format!("a; {seg}; b; {seg}");
        assert_eq!(
            merge_into_field(&twice, &newer),
            format!("a; {}; b", newer.encode())
        );
        assert_eq!(strip_from_field(&twice), "a; b");
    }

    #[test]
    fn only_segments_at_a_boundary_count() {
        assert_eq!(find_in_field("xergon1 e=1"), None);
        assert_eq!(find_in_field("a;ergon1 e=1"), None);
        assert_eq!(find_in_field("a; ergon1x"), None);
        assert!(matches!(
            find_in_field("a; ergon1 e=1"),
            Some(Err(RecordError::MissingKey("gpu")))
        ));
        // A damaged segment is still ours and gets replaced.
        assert_eq!(
            merge_into_field("a; ergon1 e=1", &sample()),
            format!("a; {}", sample().encode())
        );
    }
}
