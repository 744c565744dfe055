//! Running under systemd (issue 16): tether speaks the notify protocol to the socket named by
//! `NOTIFY_SOCKET`. These tests create that socket themselves and read what tether says:
//! `READY=1` once it serves, `RELOADING=1` / `READY=1` around a reload, `STOPPING=1` at a
//! shutdown, `WATCHDOG=1` only while every worker's loop turns, and `MAINPID=` from the process
//! an upgrade starts.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// A notify socket in a directory of its own, removed when dropped.
struct NotifySocket {
    dir: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn new(tag: &str) -> NotifySocket {
        let dir = std::env::temp_dir().join(format!("tether-notify-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = UnixDatagram::bind(dir.join("notify")).unwrap();
        NotifySocket { dir, socket }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("notify")
    }

    /// The next message, waiting up to `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one satisfies `want` (returned with those before it), or the deadline.
    fn until(&self, mut want: impl FnMut(&str) -> bool) -> (Option<String>, Vec<String>) {
        let end = Instant::now() + DEADLINE;
        let mut before = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(m) if want(&m) => return (Some(m), before),
                Some(m) => before.push(m),
                None => break,
            }
        }
        (None, before)
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn has(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

fn config_file(dir: &std::path::Path, net: u8, pool: &[Backend], extra: &str) -> PathBuf {
    let mut toml = format!(
        "admin = \"127.0.{net}.1:0\"\nworkers = 2\n{extra}\n[[service]]\nname = \"db\"\nlisten = [\"127.0.{net}.1:0\"]\nhealth-check = \"off\"\n"
    );
    for b in pool {
        toml +=
            &format!("[[service.backend]]\nname = \"{}\"\naddress = \"{}\"\n", b.name(), b.addr());
    }
    let path = dir.join("tether.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn start(notify: &NotifySocket, config: &std::path::Path, env: &[(&str, &str)]) -> Tether {
    let mut command = Command::new(bin());
    command.args(["--config", config.to_str().unwrap()]);
    command.env("NOTIFY_SOCKET", notify.path());
    for (k, v) in env {
        command.env(k, v);
    }
    Tether::start_command(command).expect("start tether")
}

#[test]
fn readiness_reloads_and_stopping_reach_the_notify_socket() {
    let pool = backends(151, 2);
    let notify = NotifySocket::new("cycle");
    let config = config_file(&notify.dir, 151, &pool, "");
    let mut t = start(&notify, &config, &[]);

    // READY=1 comes once the listener serves: a client is proxied right after it.
    let (ready, before) = notify.until(|m| has(m, "READY=1"));
    let ready = ready.expect("READY=1");
    assert!(before.is_empty(), "nothing before READY=1: {before:?}");
    assert!(ready.contains("STATUS=serving 1 services, 2 backends"), "{ready}");
    let mut s = echo_session("127.0.151.100".parse().unwrap(), t.addr());
    echo_roundtrip(&mut s, "hello").expect("proxied right after READY=1");

    // A reload: RELOADING=1 (with the monotonic time), then READY=1 with the new status.
    let one = config_file(&notify.dir, 151, &pool[..1], "");
    assert_eq!(one, config);
    t.signal(Signal::SIGHUP).unwrap();
    let reloading = notify.recv(DEADLINE).expect("RELOADING=1");
    assert!(has(&reloading, "RELOADING=1"), "{reloading}");
    let usec = reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC="));
    assert!(usec.and_then(|u| u.parse::<u64>().ok()).is_some_and(|u| u > 0), "{reloading}");
    let after = notify.recv(DEADLINE).expect("READY=1 after the reload");
    assert!(has(&after, "READY=1"), "{after}");
    assert!(after.contains("STATUS=serving 1 services, 1 backends"), "{after}");

    // A refused reload still ends with READY=1: the old configuration serves on.
    std::fs::write(&config, "this is not toml = = =").unwrap();
    t.signal(Signal::SIGHUP).unwrap();
    assert!(has(&notify.recv(DEADLINE).expect("RELOADING=1"), "RELOADING=1"));
    let refused = notify.recv(DEADLINE).expect("READY=1 after a refused reload");
    assert!(has(&refused, "READY=1"), "{refused}");
    assert!(refused.contains("last reload refused"), "{refused}");
    assert!(!refused.trim_end().contains("\n\n"), "one line per assignment: {refused:?}");

    // SIGTERM: STOPPING=1, then the process exits.
    t.signal(Signal::SIGTERM).unwrap();
    let stopping = notify.recv(DEADLINE).expect("STOPPING=1");
    assert!(has(&stopping, "STOPPING=1"), "{stopping}");
    drop(s);
    assert!(t.wait_exit(DEADLINE).is_some_and(|s| s.success()));
}

#[test]
fn the_watchdog_is_fed_while_every_worker_turns_and_starved_while_one_stalls() {
    let pool = backends(152, 1);
    let notify = NotifySocket::new("watchdog");
    let config = config_file(&notify.dir, 152, &pool, "");
    // systemd's WatchdogSec=1s: fed every half interval.
    let t = start(&notify, &config, &[("WATCHDOG_USEC", "1000000")]);
    assert!(notify.until(|m| has(m, "READY=1")).0.is_some());
    let mut fed = 0;
    let (third, _) = notify.until(|m| {
        fed += usize::from(m == "WATCHDOG=1");
        fed == 3
    });
    assert!(third.is_some(), "three WATCHDOG=1 while the workers turn");

    // A worker's loop stops turning: once the supervisor sees it stalled, no more WATCHDOG=1,
    // so systemd's watchdog fires and restarts tether.
    let frozen = FrozenThread::freeze(t.pid(), "tether-w0").expect("stop the worker");
    let start = Instant::now();
    let mut last_fed = Instant::now();
    while start.elapsed() < Duration::from_secs(12) {
        match notify.recv(Duration::from_millis(500)) {
            Some(m) if m == "WATCHDOG=1" => last_fed = Instant::now(),
            _ => {}
        }
    }
    let starved = last_fed.elapsed();
    assert!(
        starved >= Duration::from_secs(5),
        "the watchdog was fed {:?} ago while a worker stalled (frozen for {:?})",
        starved,
        start.elapsed()
    );
    drop(frozen);
    let (again, _) = notify.until(|m| m == "WATCHDOG=1");
    assert!(again.is_some(), "fed again once the worker turns");
}

#[test]
fn the_process_an_upgrade_starts_names_itself_the_main_pid_and_the_old_one_falls_silent() {
    let pool = backends(153, 1);
    let notify = NotifySocket::new("upgrade");
    let config = config_file(&notify.dir, 153, &pool, "upgrade-grace = \"2s\"\n");
    let mut t = start(&notify, &config, &[("WATCHDOG_USEC", "2000000")]);
    assert!(notify.until(|m| has(m, "READY=1")).0.is_some());
    let old = t.pid();

    let r = http(t.admin(), "POST", "/api/upgrade", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let (ready, _) = notify.until(|m| has(m, "READY=1"));
    let ready = ready.expect("READY=1 from the new process");
    let pid: u32 = ready
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("MAINPID= in {ready:?}"));
    assert_ne!(pid, old);
    let successor = Successor(Some(pid));

    // The old process drains and exits without a word: a STOPPING=1 from it would stop the unit.
    assert!(t.wait_exit(DEADLINE).is_some(), "the old process exits after its upgrade grace");
    // The new one feeds the watchdog although WATCHDOG_PID (inherited) named the old one.
    let (fed, said) = notify.until(|m| m == "WATCHDOG=1");
    assert!(fed.is_some(), "the new process feeds the watchdog");
    assert!(said.iter().all(|m| !m.contains("STOPPING=1")), "{said:?}");

    // Stopping the new process: STOPPING=1 from it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let (stopping, _) = notify.until(|m| has(m, "STOPPING=1"));
    assert!(stopping.is_some(), "STOPPING=1 from the new process");
    drop(successor);
}
