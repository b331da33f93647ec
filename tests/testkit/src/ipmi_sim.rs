//! An emulated BMC on loopback: OpenIPMI's `ipmi_sim` (Debian: openipmi) serving IPMI 2.0 over
//! LAN (RMCP+, user `admin`, password `secret`) with
//!
//! - an SDR power sensor, a Full Sensor Record named `Node Power` in watts (reading = raw × 4),
//!   its raw value polled by ipmi_sim from [`IpmiSim::sensor_raw`] every 200 ms;
//! - optionally DCMI's Get Power Reading, which ipmi_sim lacks: `tests/fixtures/ipmi_sim_dcmi.c`,
//!   built here against libopenipmi-dev's headers and loaded by ipmi_sim's own `loadlib`,
//!   answers it from [`IpmiSim::dcmi_watts`] (an integer, or `off` for a deactivated reading).
//!
//! The power figures are the simulated hardware; sessions, authentication, framing and the
//! group-extension dispatch are ipmi_sim's, and the client is the real ipmitool.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The emulated BMC's user.
pub const USER: &str = "admin";
/// Its password.
pub const PASSWORD: &str = "secret";
/// The SDR sensor's name.
pub const SENSOR: &str = "Node Power";
/// The SDR sensor's multiplier: watts = raw × this.
pub const SENSOR_M: u32 = 4;

/// A running `ipmi_sim`, killed when dropped.
#[derive(Debug)]
pub struct IpmiSim {
    child: Child,
    dir: PathBuf,
    /// Its UDP port on 127.0.0.1.
    pub port: u16,
    /// The SDR sensor's raw value (decimal text), polled every 200 ms.
    pub sensor_raw: PathBuf,
    /// The DCMI power reading in watts (decimal text, or `off`), read at each request; `None`
    /// when started without DCMI.
    pub dcmi_watts: Option<PathBuf>,
}

/// Why the emulated BMC cannot run here (a tool or package missing): pass it to
/// [`crate::missing`].
#[derive(Debug)]
pub struct Unavailable(pub String);

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the repository root")
        .to_path_buf()
}

/// Build the DCMI module into `dir`; its path.
fn build_dcmi_module(dir: &Path) -> Result<PathBuf, Unavailable> {
    let headers = Path::new("/usr/include/OpenIPMI/mcserv.h");
    if !headers.exists() {
        return Err(Unavailable(format!(
            "no {} (Debian: libopenipmi-dev) to build the DCMI module for ipmi_sim",
            headers.display()
        )));
    }
    if !have("cc", "--version") {
        return Err(Unavailable(
            "no C compiler (Debian: build-essential)".into(),
        ));
    }
    let so = dir.join("ipmi_sim_dcmi.so");
    let out = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(repo_root().join("tests/fixtures/ipmi_sim_dcmi.c"))
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "building the DCMI module failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(so)
}

/// The `Node Power` Full Sensor Record, as `0x..` words for `main_sdr_add`.
fn sensor_record() -> String {
    let name = SENSOR.as_bytes();
    #[rustfmt::skip]
    let mut body: Vec<u8> = vec![
        0x20, 0x00, 0x01, // owner, LUN, sensor number
        0x07, 0x01, // entity: system board 1
        0x7f, 0x68, // initialization, capabilities
        0x0b, 0x01, // sensor type: other units-based; reading type: threshold
        0, 0, 0, 0, 0, 0, // event and reading masks
        0x00, 0x06, 0x00, // unsigned; base unit watts; no modifier
        0x00, // linear
        SENSOR_M as u8, 0x00, 0x00, 0x00, 0x00, // M and tolerance, B = 0 and accuracy, direction
        0x00, 0x00, // exponents, analog flags
        0, 0, 0, 0xff, 0x00, // nominal, normal max/min, sensor max/min
        0, 0, 0, 0, 0, 0, // thresholds
        0, 0, 0, 0, 0, // hysteresis, reserved, OEM
    ];
    body.push(0xc0 | name.len() as u8);
    body.extend_from_slice(name);
    let mut rec = vec![0x01, 0x00, 0x51, 0x01, body.len() as u8];
    rec.extend(body);
    rec.iter()
        .map(|b| format!("0x{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

impl IpmiSim {
    /// Start ipmi_sim in `dir` (files and its state go there) with the SDR sensor at raw
    /// `sensor_raw`, and with DCMI answering `dcmi_watts` when given. Returns once it answers
    /// ipmitool (`mc info`), or [`Unavailable`] when ipmi_sim, ipmitool or what builds the
    /// module is missing.
    pub fn start(
        dir: &Path,
        sensor_raw: u32,
        dcmi_watts: Option<&str>,
    ) -> Result<Self, Unavailable> {
        for (tool, arg) in [("ipmi_sim", "-V"), ("ipmitool", "-V")] {
            if !have(tool, arg) {
                return Err(Unavailable(format!(
                    "no {tool} (Debian: openipmi, ipmitool)"
                )));
            }
        }
        std::fs::create_dir_all(dir.join("state")).expect("create ipmi_sim's state directory");
        let dcmi = match dcmi_watts {
            Some(w) => {
                let so = build_dcmi_module(dir)?;
                let file = dir.join("dcmi_watts");
                std::fs::write(&file, format!("{w}\n")).expect("write the DCMI watts");
                Some((so, file))
            }
            None => None,
        };
        let port = free_udp_port();
        let loadlib = match &dcmi {
            Some((so, file)) => format!("loadlib \"{}\" \"{}\"\n", so.display(), file.display()),
            None => String::new(),
        };
        std::fs::write(
            dir.join("lan.conf"),
            format!(
                "name \"ergontest\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {port}\n\
                 \x20   priv_limit admin\n    allowed_auths_callback md5\n    allowed_auths_user md5\n\
                 \x20   allowed_auths_operator md5\n    allowed_auths_admin md5\n\
                 \x20   guid a123456789abcdefa123456789abcdef\n  endlan\n\
                 user 2 true \"{USER}\" \"{PASSWORD}\" admin 10 md5\n{loadlib}"
            ),
        )
        .expect("write lan.conf");
        let raw = dir.join("sensor_raw");
        std::fs::write(&raw, format!("{sensor_raw}\n")).expect("write the sensor's raw value");
        std::fs::write(
            dir.join("sim.emu"),
            format!(
                "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n\
                 sel_enable 0x20 1000 0x0a\nmain_sdr_add 0x20 {}\n\
                 sensor_add 0x20 0 1 0x0b 0x01 poll 200 file \"{}\"\nmc_enable 0x20\n",
                sensor_record(),
                raw.display()
            ),
        )
        .expect("write sim.emu");
        let child = Self::spawn(dir);
        let mut sim = Self {
            child,
            dir: dir.to_path_buf(),
            port,
            sensor_raw: raw,
            dcmi_watts: dcmi.map(|(_, f)| f),
        };
        sim.await_answer();
        Ok(sim)
    }

    /// Stop it and start it again on the same port with the same files (a BMC reboot: every
    /// session it had is gone).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.dir);
        self.await_answer();
    }

    fn spawn(dir: &Path) -> Child {
        Command::new("ipmi_sim")
            .arg("-c")
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("sim.emu"))
            .arg("-s")
            .arg(dir.join("state"))
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("sim.log")).expect("create sim.log"))
            .stderr(std::fs::File::create(dir.join("sim.err")).expect("create sim.err"))
            .spawn()
            .expect("start ipmi_sim")
    }

    /// ipmitool's arguments to reach it over LAN (password in `IPMI_PASSWORD`, `-E`).
    pub fn ipmitool(&self) -> Command {
        let mut c = Command::new("ipmitool");
        c.args(["-I", "lanplus", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", USER, "-E", "-C", "3"])
            .env("IPMI_PASSWORD", PASSWORD);
        c
    }

    fn await_answer(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for ipmi_sim") {
                panic!("ipmi_sim exited ({status}): {}", self.log());
            }
            let out = self.ipmitool().arg("mc").arg("info").output();
            if out.is_ok_and(|o| o.status.success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim does not answer on {}: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// ergond's `[meters.ipmi]` section for this BMC over LAN, with the credentials file
    /// `credentials` (see [`crate::write_bmc_credentials`]).
    pub fn meters_ipmi_section(&self, credentials: &Path) -> String {
        format!(
            "[meters.ipmi]\nhost = \"127.0.0.1\"\nport = {}\ncipher_suite = 3\ntimeout_ms = 5000\n\
             credentials_file = {:?}\n",
            self.port,
            credentials.display().to_string()
        )
    }

    /// What ipmi_sim printed.
    pub fn log(&self) -> String {
        ["sim.log", "sim.err"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect()
    }

    /// Set the DCMI power reading (an integer of watts, or `off`).
    pub fn set_dcmi(&self, text: &str) {
        replace(self.dcmi_watts.as_ref().expect("started with DCMI"), text);
    }

    /// Set the SDR sensor's raw value (watts = raw × [`SENSOR_M`], seen within 200 ms).
    pub fn set_sensor_raw(&self, raw: u32) {
        replace(&self.sensor_raw, &raw.to_string());
    }
}

/// Replace `path`'s contents with `text` and a newline by a rename: ipmi_sim and the module
/// open the file at each read and see the old or the new contents, never a half-written one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("{text}\n")).expect("write the new value");
    std::fs::rename(&tmp, path).expect("replace the value");
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
