//! The processes a run starts: chaos backends (this binary's `backend` command) and what
//! /proc says about any process by pid.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// What a backend said of an upload: bytes received, bytes wrong, whether it ended cleanly.
#[derive(Clone, Copy, Debug)]
pub struct Verdict {
    pub received: u64,
    pub wrong: u64,
    pub clean: bool,
}

pub type Verdicts = Arc<Mutex<HashMap<u64, Verdict>>>;

/// A chaos backend process; killed by pid when dropped.
pub struct ChaosBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub udp: Option<SocketAddr>,
    child: Option<Child>,
    verdicts: Verdicts,
    pub stopped: bool,
}

impl ChaosBackend {
    pub fn start(
        name: &str,
        addr: SocketAddr,
        udp: Option<SocketAddr>,
        verdicts: &Verdicts,
    ) -> io::Result<ChaosBackend> {
        let mut b = ChaosBackend {
            name: name.into(),
            addr,
            udp,
            child: None,
            verdicts: Arc::clone(verdicts),
            stopped: false,
        };
        b.spawn()?;
        Ok(b)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["backend", "--name", &self.name, "--listen", &self.addr.to_string()]);
        if let Some(u) = self.udp {
            command.args(["--udp", &u.to_string()]);
        }
        let mut child = command.stdout(Stdio::piped()).stdin(Stdio::null()).spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let verdicts = Arc::clone(&self.verdicts);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("ready ") {
                    let _ = tx.send(addr.to_string());
                    continue;
                }
                let parts: Vec<&str> = line.split_whitespace().collect();
                if let ["R", id, received, wrong, how] = parts[..] {
                    if let (Ok(id), Ok(received), Ok(wrong)) =
                        (id.parse(), received.parse(), wrong.parse())
                    {
                        let v = Verdict { received, wrong, clean: how == "ok" };
                        verdicts.lock().unwrap_or_else(|e| e.into_inner()).insert(id, v);
                    }
                }
            }
        });
        self.child = Some(child);
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(_) => Ok(()),
            Err(_) => {
                self.kill();
                Err(io::Error::other(format!(
                    "backend {} did not start on {}",
                    self.name, self.addr
                )))
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.stopped {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
                self.stopped = false;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn signal_stop(&mut self, stop: bool) {
        if let Some(pid) = self.pid() {
            let sig = if stop { Signal::SIGSTOP } else { Signal::SIGCONT };
            let _ = kill(Pid::from_raw(pid as i32), sig);
            self.stopped = stop;
        }
    }
}

impl Drop for ChaosBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A field of /proc/PID/status in KiB (`VmRSS:`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok())
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

pub fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// User plus system CPU time in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
}

/// SIGKILL a pid this run started (directly or through an upgrade) and wait until it is gone.
pub fn kill_pid(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sockets in `/proc/net/tcp{,6}` whose local or remote port is one of `ports`, by state name.
pub fn tcp_states(ports: &[u16]) -> HashMap<&'static str, usize> {
    let mut out = HashMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let port =
                |a: &str| a.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            let (l, r) = (port(f[1]), port(f[2]));
            if !ports.iter().any(|p| Some(*p) == l || Some(*p) == r) {
                continue;
            }
            let state = match f[3] {
                "01" => "ESTABLISHED",
                "02" => "SYN_SENT",
                "03" => "SYN_RECV",
                "04" => "FIN_WAIT1",
                "05" => "FIN_WAIT2",
                "06" => "TIME_WAIT",
                "07" => "CLOSE",
                "08" => "CLOSE_WAIT",
                "09" => "LAST_ACK",
                "0A" => "LISTEN",
                "0B" => "CLOSING",
                _ => "OTHER",
            };
            *out.entry(state).or_insert(0) += 1;
        }
    }
    out
}
