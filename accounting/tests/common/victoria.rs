//! A real VictoriaMetrics (`/usr/bin/victoria-metrics`, Debian's package, which
//! `scripts/slurm-cluster install` installs) on a loopback port of the test's choosing, killed
//! when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// Send `signal` to `child`, a child this test started and has not reaped.
pub fn signal(child: &Child, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

pub const VM: &str = "/usr/bin/victoria-metrics";

pub struct Vm {
    pub child: Child,
    pub port: u16,
}

impl Vm {
    pub fn start(port: u16, data: &Path) -> Vm {
        Vm::start_with(port, data, &[])
    }

    /// [`Vm::start`] with more command-line flags.
    pub fn start_with(port: u16, data: &Path, flags: &[&str]) -> Vm {
        let child = Command::new(VM)
            .args(flags)
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", data.display()))
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("victoria-metrics is installed (scripts/slurm-cluster installs it)");
        let mut vm = Vm { child, port };
        // Healthy, and ours: another process (another test's VictoriaMetrics, which may have
        // been given the port while ours was down) would answer /health too.
        let ours = format!("-storageDataPath=\"{}\"", data.display());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = vm.child.try_wait() {
                panic!("victoria-metrics on port {port} exited at start ({status}): is the port taken?");
            }
            if get(&format!("http://127.0.0.1:{port}/flags")).is_some_and(|f| f.contains(&ours)) {
                return vm;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("victoria-metrics did not become healthy on port {port}");
    }

    /// Graceful stop (SIGTERM): in-flight requests finish, data is flushed.
    pub fn stop(mut self) {
        signal(&self.child, Signal::SIGTERM);
        self.child.wait().unwrap();
    }

    /// SIGSTOP (`stop = true`) or SIGCONT: a stopped VictoriaMetrics accepts connections and
    /// never answers, like a hung server.
    pub fn pause(&self, stop: bool) {
        signal(
            &self.child,
            if stop {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            },
        );
    }

    /// SIGKILL: whatever VictoriaMetrics holds only in memory is lost.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn get(url: &str) -> Option<String> {
    let r = reqwest::blocking::get(url).ok()?;
    r.status().is_success().then(|| r.text().unwrap())
}
