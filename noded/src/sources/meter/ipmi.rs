//! The node's power from its BMC over IPMI, through `ipmitool` (run without a shell).
//!
//! * DCMI first: `ipmitool dcmi power reading` → `Instantaneous power reading: <W> Watts`
//!   (a `Power reading state is: deactivated` BMC has none);
//! * else, when `sensor` is configured, that SDR sensor: `ipmitool -c sensor reading <name>` →
//!   `<name>,<W>` (a sensor whose unit is watts; BMCs without DCMI often have one, e.g.
//!   `Pwr Consumption`, `Total Power`, `SYS Power`).
//!
//! The first read finds which one works; later reads use that one only. Without `host`, the
//! node's own BMC is read in-band (`-I open`, `/dev/ipmi0`, root); with `host`, over the
//! network (`-I lanplus`, IPMI 2.0), with the credentials file's `username`/`password` (root
//! only, as for Redfish; the password reaches ipmitool in its environment, `-E`, never on its
//! command line).
//!
//! By default (`session = true`) one `ipmitool … shell` stays open between reads, so the node
//! pays for one process and one RMCP+ session handshake, not one per read (measured: about
//! 36 ms of CPU per read with one ipmitool per read over LAN, about 2 ms in a session, see
//! BENCHMARKS.md). Each read
//! writes the command to the shell and takes its output up to the next prompt. Any failed read
//! (an error from the BMC, output without the expected reading, the shell gone, no prompt in
//! time) closes the session; the next read opens a new one. With `session = false`, one
//! ipmitool per read. Either way each read is bounded by `timeout_ms`: an ipmitool that has not
//! answered then is killed. Run this meter on a thread of its own ([`super::MeterWorker`]).

use super::redfish::{load_credentials, Credentials};
use super::{MeterError, MeterKind, MeterReading, NodeMeter, Quantity};
use std::io::{Read, Write as _};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Largest ipmitool output read.
const MAX_OUTPUT_BYTES: u64 = 64 * 1024;

fn default_ipmitool() -> PathBuf {
    PathBuf::from("ipmitool")
}
fn default_port() -> u16 {
    623
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_resolution_ms() -> u64 {
    1_000
}
fn default_session() -> bool {
    true
}

/// ipmitool's shell prompt: a command's output ends where it is printed again.
const PROMPT: &[u8] = b"ipmitool> ";

/// `[meters.ipmi]` in ergond.toml.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpmiConfig {
    /// The BMC's address for IPMI over LAN (`lanplus`); unset: the local BMC, in-band.
    #[serde(default)]
    pub host: Option<String>,
    /// The BMC's UDP port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// TOML with `username` and `password`, root-owned, mode 0600 or 0400; required with
    /// `host`.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// An SDR sensor in watts to read when the BMC has no DCMI power reading.
    #[serde(default)]
    pub sensor: Option<String>,
    /// RMCP+ cipher suite (`ipmitool -C`); unset: ipmitool's choice.
    #[serde(default)]
    pub cipher_suite: Option<u8>,
    /// The ipmitool program.
    #[serde(default = "default_ipmitool")]
    pub ipmitool: PathBuf,
    /// Bound on one read, ms: ipmitool is killed after it.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How often the BMC refreshes its reading, ms.
    #[serde(default = "default_resolution_ms")]
    pub resolution_ms: u64,
    /// Keep one `ipmitool shell` (one BMC session) open between reads; `false`: one ipmitool
    /// per read.
    #[serde(default = "default_session")]
    pub session: bool,
}

impl IpmiConfig {
    /// In-band (local BMC) with the defaults.
    pub fn local() -> Self {
        Self {
            host: None,
            port: default_port(),
            credentials_file: None,
            sensor: None,
            cipher_suite: None,
            ipmitool: default_ipmitool(),
            timeout_ms: default_timeout_ms(),
            resolution_ms: default_resolution_ms(),
            session: default_session(),
        }
    }
}

/// Parse `ipmitool dcmi power reading`'s output: the instantaneous power in watts.
pub fn parse_dcmi(text: &str) -> Result<f64, String> {
    if let Some(state) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Power reading state is:"))
    {
        if state.trim() != "activated" {
            return Err(format!("the BMC's DCMI power reading is {}", state.trim()));
        }
    }
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Instantaneous power reading:"))
        .ok_or_else(|| "no `Instantaneous power reading:` line".to_string())?;
    let mut words = line.split_whitespace();
    let value = words
        .next()
        .and_then(|w| w.parse::<f64>().ok())
        .ok_or_else(|| format!("not a number of watts: {:?}", line.trim()))?;
    match words.next() {
        Some("Watts") => Ok(value),
        other => Err(format!("unit {other:?} is not Watts")),
    }
}

/// Parse `ipmitool -c sensor reading <name>`'s output (`<name>,<value>`).
pub fn parse_sensor(text: &str, name: &str) -> Result<f64, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(','))
        .ok_or_else(|| format!("no reading of sensor {name:?}"))?;
    let value = line[name.len() + 1..].trim();
    value
        .parse::<f64>()
        .map_err(|_| format!("sensor {name:?} has no numeric reading ({value:?})"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Dcmi,
    Sensor,
}

/// The BMC's power through ipmitool.
pub struct IpmiMeter {
    cfg: IpmiConfig,
    credentials: Option<Credentials>,
    via: Option<Via>,
    /// The open `ipmitool shell`, in session mode, between reads.
    shell: Option<Shell>,
}

/// Why an ipmitool run gave no output to parse.
enum RunError {
    /// Not answered within the bound (killed).
    Timeout,
    /// It ended (or, in a session, its shell did) with this output.
    Ended(String),
    /// It could not be started or talked to.
    Io(std::io::Error),
}

/// A running `ipmitool … shell`: stdout and stderr into one pipe, read by a thread of its own
/// into a channel, so that every wait is bounded.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    output: mpsc::Receiver<Vec<u8>>,
}

impl Shell {
    /// Start `cmd shell` and wait for its first prompt (the session is open).
    fn start(mut cmd: Command, timeout: Duration) -> Result<Self, RunError> {
        let (read_end, write_end) = nix::unistd::pipe().map_err(|e| RunError::Io(e.into()))?;
        let err_end = write_end.try_clone().map_err(RunError::Io)?;
        // A shell left behind by a killed ergond would spin on its closed input: it dies with
        // the thread that starts it (the meter's own thread).
        crate::sys::die_with_parent(&mut cmd);
        cmd.arg("shell")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::from(err_end));
        let spawned = cmd.spawn();
        // The command holds the pipe's write ends until dropped: drop them now, so that the
        // reader sees the end of the output when ipmitool ends.
        drop(cmd);
        let mut child = spawned.map_err(RunError::Io)?;
        let Some(stdin) = child.stdin.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RunError::Io(std::io::Error::other("no stdin")));
        };
        let (tx, output) = mpsc::channel();
        let mut reader = std::fs::File::from(read_end);
        let spawned = std::thread::Builder::new()
            .name("ergond-ipmitool".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = reader.read(&mut buf) {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
        let mut shell = Self {
            child,
            stdin,
            output,
        };
        spawned.map_err(RunError::Io)?;
        shell.until_prompt(timeout)?;
        Ok(shell)
    }

    /// Everything ipmitool prints up to its next prompt (without it).
    fn until_prompt(&mut self, timeout: Duration) -> Result<String, RunError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => {
                    out.extend_from_slice(&chunk);
                    if out.ends_with(PROMPT) {
                        out.truncate(out.len() - PROMPT.len());
                        return Ok(String::from_utf8_lossy(&out).into_owned());
                    }
                    if out.len() as u64 > MAX_OUTPUT_BYTES {
                        return Err(RunError::Ended(format!(
                            "more than {MAX_OUTPUT_BYTES} bytes without a prompt"
                        )));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(RunError::Timeout),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(RunError::Ended(String::from_utf8_lossy(&out).into_owned()))
                }
            }
        }
    }

    /// Run one command line in the shell; its output.
    fn run(&mut self, line: &str, timeout: Duration) -> Result<String, RunError> {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|_| RunError::Ended(String::new()))?;
        self.until_prompt(timeout)
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        // Our own child: kill it and reap it; its reader thread ends at the pipe's end.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ipmitool's message lines, joined (its cipher-suite probing noise left out).
fn message(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Unable to Get Channel Cipher Suites"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl std::fmt::Debug for IpmiMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpmiMeter")
            .field("host", &self.cfg.host)
            .field("sensor", &self.cfg.sensor)
            .field("via", &self.via)
            .finish_non_exhaustive()
    }
}

impl IpmiMeter {
    /// Check the configuration and read the credentials; runs nothing yet.
    pub fn new(cfg: IpmiConfig) -> Result<Self, MeterError> {
        let credentials = match (&cfg.host, &cfg.credentials_file) {
            (Some(h), _) if h.is_empty() || h.starts_with('-') => {
                return Err(MeterError::Config(format!("IPMI host {h:?} is not a host")))
            }
            (Some(_), Some(file)) => Some(load_credentials(file)?),
            (Some(_), None) => {
                return Err(MeterError::Config(
                    "IPMI over LAN (`host`) needs `credentials_file` in [meters.ipmi]".into(),
                ))
            }
            (None, _) => None,
        };
        if let Some(name) = &cfg.sensor {
            if name.is_empty() || name.contains(['"', '\\']) || name.chars().any(char::is_control) {
                return Err(MeterError::Config(format!(
                    "IPMI sensor name {name:?} is empty or has quotes, backslashes or control \
                     characters"
                )));
            }
        }
        Ok(Self {
            cfg,
            credentials,
            via: None,
            shell: None,
        })
    }

    fn where_(&self) -> String {
        match &self.cfg.host {
            Some(h) => format!("{h}:{}", self.cfg.port),
            None => "the local BMC".into(),
        }
    }

    /// The process id of the open `ipmitool shell`, if a session is open (diagnostics, tests).
    pub fn session_pid(&self) -> Option<u32> {
        self.shell.as_ref().map(|s| s.child.id())
    }

    /// ipmitool with the connection arguments (and CSV output), without a command yet.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.cfg.ipmitool);
        cmd.arg("-c");
        match (&self.cfg.host, &self.credentials) {
            (Some(host), Some(c)) => {
                cmd.args(["-I", "lanplus", "-H", host, "-p"])
                    .arg(self.cfg.port.to_string())
                    .args(["-U", &c.username, "-E"])
                    .env("IPMI_PASSWORD", &c.password);
                if let Some(cs) = self.cfg.cipher_suite {
                    cmd.arg("-C").arg(cs.to_string());
                }
            }
            _ => {
                cmd.args(["-I", "open"]);
            }
        }
        cmd
    }

    /// Run `args` (a command of ipmitool's); its output when it holds `expect`, else an error
    /// with ipmitool's messages.
    fn ipmitool(&mut self, args: &[&str], expect: &str) -> Result<String, MeterError> {
        let what = format!("ipmitool {} ({})", args.join(" "), self.where_());
        let timeout = Duration::from_millis(self.cfg.timeout_ms.max(1));
        let result = if self.cfg.session {
            self.in_session(args, timeout)
        } else {
            self.one_shot(args, timeout)
        };
        let err = match result {
            Ok(out) if out.contains(expect) => return Ok(out),
            Ok(out) => {
                // The BMC's answer was an error: a new session for the next read.
                self.shell = None;
                return Err(MeterError::Request(format!("{what}: {}", message(&out))));
            }
            Err(e) => {
                self.shell = None;
                e
            }
        };
        Err(match err {
            RunError::Timeout => MeterError::Request(format!(
                "{what}: no answer within {} ms",
                self.cfg.timeout_ms
            )),
            RunError::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
                MeterError::NotFound(format!(
                    "cannot run {}: {e} (Debian: apt install ipmitool; or set `ipmitool` in \
                     [meters.ipmi])",
                    self.cfg.ipmitool.display()
                ))
            }
            RunError::Io(e) => MeterError::Request(format!("{what}: {e}")),
            RunError::Ended(out) => {
                let msg = message(&out);
                if self.cfg.host.is_none() && msg.contains("Could not open device") {
                    // In-band without the kernel's IPMI device: nothing to retry until an admin
                    // acts.
                    MeterError::NotFound(format!(
                        "{what}: {msg}. In-band IPMI needs the kernel's IPMI device: load its \
                         drivers (`modprobe ipmi_si ipmi_devintf`, or ipmi_ssif on some boards) \
                         on a node with a BMC, run ergond as root, or set `host` in [meters.ipmi] \
                         to read the BMC over the network"
                    ))
                } else {
                    MeterError::Request(format!("{what}: ipmitool ended: {msg}"))
                }
            }
        })
    }

    /// `args` in the open shell (opening it first).
    fn in_session(&mut self, args: &[&str], timeout: Duration) -> Result<String, RunError> {
        if self.shell.is_none() {
            self.shell = Some(Shell::start(self.command(), timeout)?);
        }
        let line = args
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("\"{a}\"")
                } else {
                    (*a).to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        self.shell
            .as_mut()
            .expect("just opened")
            .run(&line, timeout)
    }

    /// One ipmitool for `args`: its stdout when it succeeds, else [`RunError::Ended`] with
    /// its messages.
    fn one_shot(&self, args: &[&str], timeout: Duration) -> Result<String, RunError> {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(RunError::Io)?;
        let read_all = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(r) = r {
                    let _ = r.take(MAX_OUTPUT_BYTES).read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = read_all(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = read_all(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    // Our own child: kill it, reap it, and let the pipe readers end.
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = out.join();
                    let _ = err.join();
                    return Err(RunError::Timeout);
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(RunError::Io(e)),
            }
        };
        let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        if status.success() {
            Ok(stdout)
        } else {
            Err(RunError::Ended(format!("{status}\n{stderr}\n{stdout}")))
        }
    }

    fn read_via(&mut self, via: Via) -> Result<f64, MeterError> {
        let fmt = |what: String| {
            move |why: String| MeterError::Format {
                what: what.clone(),
                why,
            }
        };
        match via {
            Via::Dcmi => {
                let out =
                    self.ipmitool(&["dcmi", "power", "reading"], "Instantaneous power reading")?;
                parse_dcmi(&out).map_err(fmt(format!("DCMI power reading ({})", self.where_())))
            }
            Via::Sensor => {
                let name = self.cfg.sensor.clone().unwrap_or_default();
                let out = self.ipmitool(&["sensor", "reading", &name], &format!("{name},"))?;
                parse_sensor(&out, &name)
                    .map_err(fmt(format!("IPMI sensor {name:?} ({})", self.where_())))
            }
        }
    }
}

impl NodeMeter for IpmiMeter {
    fn kind(&self) -> MeterKind {
        MeterKind::Ipmi
    }

    fn source(&self) -> String {
        match self.via {
            Some(Via::Sensor) => format!(
                "ipmi {} sensor {:?}",
                self.where_(),
                self.cfg.sensor.as_deref().unwrap_or_default()
            ),
            Some(Via::Dcmi) => format!("ipmi {} DCMI power reading", self.where_()),
            None => format!("ipmi {}", self.where_()),
        }
    }

    fn resolution_ns(&self) -> u64 {
        self.cfg.resolution_ms.saturating_mul(1_000_000)
    }

    /// The session dies with the thread that opened it: close it here, before the meter moves.
    fn release(&mut self) {
        self.shell = None;
    }

    fn read(&mut self) -> Result<MeterReading, MeterError> {
        let start = crate::clock::monotonic_ns();
        let watts = match self.via {
            Some(via) => self.read_via(via)?,
            None => match self.read_via(Via::Dcmi) {
                Ok(w) => {
                    self.via = Some(Via::Dcmi);
                    w
                }
                // No ipmitool or no IPMI device: a sensor would not read either.
                Err(e @ MeterError::NotFound(_)) => return Err(e),
                Err(dcmi) if self.cfg.sensor.is_some() => {
                    let w = self
                        .read_via(Via::Sensor)
                        .map_err(|e| MeterError::NotFound(format!("{dcmi}; and then {e}")))?;
                    self.via = Some(Via::Sensor);
                    w
                }
                Err(dcmi) => {
                    return Err(MeterError::NotFound(format!(
                        "{dcmi}. A BMC without DCMI may have an SDR power sensor (`ipmitool \
                         sensor list`, unit Watts): name it in `sensor` in [meters.ipmi]"
                    )))
                }
            },
        };
        let end = crate::clock::monotonic_ns();
        Ok(MeterReading {
            at_ns: start + (end - start) / 2,
            quantity: Quantity::Power { watts },
            generation: None,
            freshness: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dcmi_output_parses() {
        let text = "
    Instantaneous power reading:                   312 Watts
    Minimum during sampling period:                 48 Watts
    Maximum during sampling period:                420 Watts
    Average power reading over sample period:      300 Watts
    IPMI timestamp:                           Sun Dec  6 08:00:00 2026
    Sampling period:                          00000005 Seconds.
    Power reading state is:                   activated
";
        assert_eq!(parse_dcmi(text), Ok(312.0));
        let off = text.replace(
            "state is:                   activated",
            "state is: deactivated",
        );
        assert!(parse_dcmi(&off).unwrap_err().contains("deactivated"));
        assert!(parse_dcmi("garbage").is_err());
    }

    #[test]
    fn sensor_names_that_would_break_the_shell_line_are_refused() {
        for bad in ["", "Pwr \"x", "Pwr\\x", "Pwr\nsensor list"] {
            let mut c = IpmiConfig::local();
            c.sensor = Some(bad.into());
            assert!(
                matches!(IpmiMeter::new(c), Err(MeterError::Config(_))),
                "{bad:?} accepted"
            );
        }
        let mut c = IpmiConfig::local();
        c.sensor = Some("Pwr Consumption".into());
        assert!(IpmiMeter::new(c).is_ok());
    }

    #[test]
    fn sensor_output_parses() {
        assert_eq!(parse_sensor("Node Power,320\n", "Node Power"), Ok(320.0));
        assert_eq!(parse_sensor("Node Power,27.50\n", "Node Power"), Ok(27.5));
        assert!(parse_sensor("Node Power,na\n", "Node Power").is_err());
        assert!(parse_sensor("Node Powerful,3\n", "Node Power").is_err());
    }
}
