//! The node's power as its BMC reports it through Redfish.
//!
//! One HTTPS GET per read, with basic authentication:
//! `<url>/redfish/v1/Chassis/<id>/Power` → `PowerControl[0].PowerConsumedWatts`, or, when the
//! BMC has no `Power` resource (it is deprecated since Redfish 2020.4),
//! `<url>/redfish/v1/Chassis/<id>/EnvironmentMetrics` → `PowerWatts.Reading`. The first read
//! finds which one the BMC has; later reads use that one only.
//!
//! * Credentials come from a TOML file (`username = "..."`, `password = "..."`) that must be a
//!   regular file owned by root with mode 0600 or 0400; anything else is refused with a message
//!   saying how to fix it. The file is opened without following symlinks and checked on the
//!   open descriptor.
//! * TLS: the server certificate is checked against `ca_file` when one is configured (and only
//!   against it), otherwise against the built-in web roots. `insecure = true` accepts any
//!   certificate, and is the only way to use plain `http://`: credentials then cross the network
//!   readable by anyone on it, so it is meant for isolated management networks and tests.
//! * Every request has a timeout, and a response larger than `max_response_bytes` is refused.
//! * A BMC read takes 100 ms to seconds: run this meter on a thread of its own
//!   ([`super::MeterWorker`]), never on a sampling thread.

use super::{MeterError, MeterKind, MeterReading, NodeMeter, Quantity};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default per-request timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// Default bound on a response body.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1 << 20;
/// Default resolution: BMCs refresh their power reading about once a second.
pub const DEFAULT_RESOLUTION_MS: u64 = 1_000;

/// Largest credentials file read.
const MAX_CREDENTIALS_BYTES: u64 = 4096;

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_max_response_bytes() -> u64 {
    DEFAULT_MAX_RESPONSE_BYTES
}
fn default_resolution_ms() -> u64 {
    DEFAULT_RESOLUTION_MS
}

/// `[meters.redfish]` in ergond.toml.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedfishConfig {
    /// The BMC's base URL, `https://bmc-host[:port]`.
    pub url: String,
    /// The chassis id (`/redfish/v1/Chassis/<id>`). Unset: the only member of the Chassis
    /// collection (several members are an error that lists them).
    #[serde(default)]
    pub chassis: Option<String>,
    /// TOML file with `username` and `password`: owned by root, mode 0600 or 0400.
    pub credentials_file: PathBuf,
    /// PEM file with the CA certificate(s) that signed the BMC's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate, and allow plain `http://`. Credentials are then exposed to the
    /// network; for isolated management networks and tests only.
    #[serde(default)]
    pub insecure: bool,
    /// Per-request timeout, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Largest response body accepted, bytes.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// How often the BMC refreshes its reading, ms.
    #[serde(default = "default_resolution_ms")]
    pub resolution_ms: u64,
}

impl RedfishConfig {
    /// A configuration with the defaults for everything but the URL and credentials file.
    pub fn new(url: &str, credentials_file: &Path) -> Self {
        Self {
            url: url.to_string(),
            chassis: None,
            credentials_file: credentials_file.to_path_buf(),
            ca_file: None,
            insecure: false,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            resolution_ms: DEFAULT_RESOLUTION_MS,
        }
    }
}

/// Username and password for the BMC.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// The BMC account.
    pub username: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Read the credentials file, refusing it unless it is a regular file owned by root with mode
/// 0600 or 0400 (checked on the open descriptor, opened without following a symlink).
pub fn load_credentials(path: &Path) -> Result<Credentials, MeterError> {
    let refuse = |why: String| {
        MeterError::Credentials(format!(
            "refusing BMC credentials file {}: {why}. It must be a regular file owned by root \
             with mode 0600 or 0400: `chown root:root {0}; chmod 0600 {0}`",
            path.display()
        ))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                refuse("it is a symbolic link".into())
            } else {
                MeterError::Credentials(format!(
                    "cannot open BMC credentials file {}: {e}",
                    path.display()
                ))
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| MeterError::Credentials(format!("cannot stat {}: {e}", path.display())))?;
    if !meta.file_type().is_file() {
        return Err(refuse("it is not a regular file".into()));
    }
    if meta.uid() != 0 {
        return Err(refuse(format!("it is owned by uid {}", meta.uid())));
    }
    let mode = meta.mode() & 0o7777;
    if mode != 0o600 && mode != 0o400 {
        return Err(refuse(format!("its mode is {mode:04o}")));
    }
    let mut text = String::new();
    file.take(MAX_CREDENTIALS_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| MeterError::Credentials(format!("cannot read {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_CREDENTIALS_BYTES {
        return Err(refuse(format!(
            "it is larger than {MAX_CREDENTIALS_BYTES} bytes"
        )));
    }
    toml::from_str(&text).map_err(|e| {
        MeterError::Credentials(format!(
            "{}: expected `username = \"...\"` and `password = \"...\"`: {}",
            path.display(),
            e.message()
        ))
    })
}

/// Which resource gives the power.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Power,
    EnvironmentMetrics,
}

/// The BMC's power reading through Redfish.
pub struct RedfishMeter {
    cfg: RedfishConfig,
    base: String,
    client: reqwest::blocking::Client,
    credentials: Credentials,
    chassis_path: Option<String>,
    resource: Option<Resource>,
}

impl std::fmt::Debug for RedfishMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedfishMeter")
            .field("url", &self.cfg.url)
            .field("chassis", &self.chassis_path)
            .field("resource", &self.resource)
            .finish_non_exhaustive()
    }
}

impl RedfishMeter {
    /// Check the configuration, read the credentials and build the HTTPS client. Sends nothing:
    /// the first [`NodeMeter::read`] finds the chassis and the power resource.
    ///
    /// The client is reqwest's blocking one: create, read and drop the meter on a plain thread
    /// (a [`super::MeterWorker`]'s), never inside an async runtime, where reqwest panics.
    pub fn new(cfg: RedfishConfig) -> Result<Self, MeterError> {
        let base = cfg.url.trim_end_matches('/').to_string();
        let scheme_ok =
            base.starts_with("https://") || (cfg.insecure && base.starts_with("http://"));
        if !scheme_ok {
            return Err(MeterError::Config(format!(
                "Redfish url {:?} must start with https:// (plain http:// sends the BMC password \
                 in clear text; it is accepted only with insecure = true)",
                cfg.url
            )));
        }
        if let Some(id) = &cfg.chassis {
            if id.is_empty() || id.contains(['/', '?', '#', '%']) || id == "." || id == ".." {
                return Err(MeterError::Config(format!(
                    "Redfish chassis id {id:?} is not a plain resource id"
                )));
            }
        }
        let credentials = load_credentials(&cfg.credentials_file)?;
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let mut builder = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ergond/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca).map_err(|source| MeterError::Io {
                path: ca.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                MeterError::Config(format!(
                    "{}: not a PEM certificate bundle: {e}",
                    ca.display()
                ))
            })?;
            if certs.is_empty() {
                return Err(MeterError::Config(format!(
                    "{}: no certificate in the file",
                    ca.display()
                )));
            }
            builder = builder.tls_built_in_root_certs(false);
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        if cfg.insecure {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let client = builder
            .build()
            .map_err(|e| MeterError::Config(format!("cannot build the HTTPS client: {e}")))?;
        let chassis_path = cfg
            .chassis
            .as_ref()
            .map(|id| format!("/redfish/v1/Chassis/{id}"));
        Ok(Self {
            cfg,
            base,
            client,
            credentials,
            chassis_path,
            resource: None,
        })
    }

    /// GET `path` (absolute, from `/redfish/v1`); `Ok(None)` for 404.
    fn get(&self, path: &str) -> Result<Option<serde_json::Value>, MeterError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .client
            .get(&url)
            .basic_auth(&self.credentials.username, Some(&self.credentials.password))
            .header("Accept", "application/json")
            .send()
            .map_err(|e| {
                let what = if e.is_timeout() {
                    format!("no answer within {} ms", self.cfg.timeout_ms)
                } else {
                    error_chain(&e)
                };
                MeterError::Request(format!("Redfish GET {url}: {what}"))
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(MeterError::Credentials(format!(
                "Redfish GET {url}: the BMC refused the credentials from {} (HTTP {})",
                self.cfg.credentials_file.display(),
                status.as_u16()
            )));
        }
        if !status.is_success() {
            return Err(MeterError::Request(format!(
                "Redfish GET {url}: HTTP {status}"
            )));
        }
        let max = self.cfg.max_response_bytes;
        if resp.content_length().is_some_and(|n| n > max) {
            return Err(MeterError::Request(format!(
                "Redfish GET {url}: response larger than {max} bytes"
            )));
        }
        let mut body = Vec::new();
        if let Err(e) = resp.take(max + 1).read_to_end(&mut body) {
            // Many BMC web servers end a response without Content-Length by closing the TLS
            // connection without close_notify. The body is then taken only if it is a complete
            // JSON object (checked below): a cut one cannot parse as one.
            if !(is_unexpected_eof(&e) && body.first() == Some(&b'{')) {
                return Err(MeterError::Request(format!(
                    "Redfish GET {url}: reading the body: {}",
                    error_chain(&e)
                )));
            }
        }
        if body.len() as u64 > max {
            return Err(MeterError::Request(format!(
                "Redfish GET {url}: response larger than {max} bytes"
            )));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| MeterError::Format {
                what: format!("Redfish GET {url}"),
                why: format!("not JSON: {e}"),
            })
    }

    /// The chassis path: configured, or the only member of the Chassis collection.
    fn chassis(&mut self) -> Result<String, MeterError> {
        if let Some(p) = &self.chassis_path {
            return Ok(p.clone());
        }
        let what = format!("Redfish GET {}/redfish/v1/Chassis", self.base);
        let coll = self.get("/redfish/v1/Chassis")?.ok_or_else(|| {
            MeterError::NotFound(format!("{what}: the BMC has no Chassis collection"))
        })?;
        let members: Vec<String> = coll
            .get("Members")
            .and_then(|m| m.as_array())
            .map(|m| {
                m.iter()
                    .filter_map(|x| x.get("@odata.id")?.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        match members.as_slice() {
            [one] if one.starts_with("/redfish/v1/Chassis/") && !one.contains(['?', '#']) => {
                let p = one.trim_end_matches('/').to_string();
                self.chassis_path = Some(p.clone());
                Ok(p)
            }
            [] => Err(MeterError::NotFound(format!("{what}: no chassis"))),
            many => Err(MeterError::Config(format!(
                "{what}: several chassis ({}); set `chassis` in [meters.redfish] to the node's",
                many.join(", ")
            ))),
        }
    }

    fn watts_from(resource: Resource, doc: &serde_json::Value) -> Option<&serde_json::Value> {
        match resource {
            Resource::Power => doc
                .get("PowerControl")?
                .as_array()?
                .first()?
                .get("PowerConsumedWatts"),
            Resource::EnvironmentMetrics => doc.get("PowerWatts")?.get("Reading"),
        }
    }

    fn path_of(chassis: &str, resource: Resource) -> String {
        match resource {
            Resource::Power => format!("{chassis}/Power"),
            Resource::EnvironmentMetrics => format!("{chassis}/EnvironmentMetrics"),
        }
    }
}

/// Whether `e` or one of its sources is an unexpected end of file (a TLS peer that closed
/// without close_notify).
fn is_unexpected_eof(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// An error with its sources, which carry the useful part (TLS, connection refused).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

impl NodeMeter for RedfishMeter {
    fn kind(&self) -> MeterKind {
        MeterKind::Redfish
    }

    fn source(&self) -> String {
        match (&self.chassis_path, self.resource) {
            (Some(c), Some(r)) => format!("redfish {}{}", self.base, Self::path_of(c, r)),
            _ => format!("redfish {}", self.base),
        }
    }

    fn resolution_ns(&self) -> u64 {
        self.cfg.resolution_ms.saturating_mul(1_000_000)
    }

    fn read(&mut self) -> Result<MeterReading, MeterError> {
        let chassis = self.chassis()?;
        let candidates: &[Resource] = match self.resource {
            Some(Resource::Power) => &[Resource::Power],
            Some(Resource::EnvironmentMetrics) => &[Resource::EnvironmentMetrics],
            None => &[Resource::Power, Resource::EnvironmentMetrics],
        };
        let mut tried = Vec::new();
        for &resource in candidates {
            let path = Self::path_of(&chassis, resource);
            let start = crate::clock::monotonic_ns();
            let Some(doc) = self.get(&path)? else {
                tried.push(format!("{path} (404)"));
                continue;
            };
            let end = crate::clock::monotonic_ns();
            let what = format!("Redfish GET {}{path}", self.base);
            let watts = match Self::watts_from(resource, &doc) {
                Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                Some(serde_json::Value::Null) => {
                    return Err(MeterError::Format {
                        what,
                        why: "the BMC has no power reading now (null)".into(),
                    })
                }
                Some(other) => {
                    return Err(MeterError::Format {
                        what,
                        why: format!("power reading is not a number: {other}"),
                    })
                }
                None if self.resource.is_none() => {
                    tried.push(format!("{path} (no reading in it)"));
                    continue;
                }
                None => {
                    return Err(MeterError::Format {
                        what,
                        why: match resource {
                            Resource::Power => "no PowerControl[0].PowerConsumedWatts".into(),
                            Resource::EnvironmentMetrics => "no PowerWatts.Reading".into(),
                        },
                    })
                }
            };
            self.resource = Some(resource);
            return Ok(MeterReading {
                // The BMC answered somewhere between sending and receiving: take the middle.
                at_ns: start + (end - start) / 2,
                quantity: Quantity::Power { watts },
                generation: None,
                freshness: None,
            });
        }
        Err(MeterError::NotFound(format!(
            "Redfish BMC {} has no power reading: tried {}",
            self.base,
            tried.join(", ")
        )))
    }
}
