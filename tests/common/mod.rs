//! Shared helpers for the black-box tests: start backends on distinct loopback addresses and the
//! real `tether` binary in front of them.

#![allow(dead_code)] // each test file uses its own subset

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

pub use testkit::*;

/// Generous: tests run on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

/// Backends named `b0`, `b1`, ... on 127.0.<net>.(10+i), ports from the kernel.
pub fn backends(net: u8, n: usize) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, net, 10 + i as u8));
            Backend::start(&format!("b{i}"), SocketAddr::new(ip, 0)).expect("start backend")
        })
        .collect()
}

/// `--backend ADDR,name=NAME` for each backend.
pub fn backend_args(backends: &[Backend]) -> Vec<String> {
    backends
        .iter()
        .flat_map(|b| ["--backend".to_string(), format!("{},name={}", b.addr(), b.name())])
        .collect()
}

/// Start tether listening on 127.0.<net>.1:0 with two workers, the backends, and `extra` flags.
pub fn tether(net: u8, backends: &[Backend], extra: &[&str]) -> Tether {
    let mut args =
        vec!["--listen".to_string(), format!("127.0.{net}.1:0"), "--workers".into(), "2".into()];
    args.extend(backend_args(backends));
    args.extend(extra.iter().map(|s| s.to_string()));
    Tether::start(bin(), no_probes(&args)).expect("start tether")
}

/// Index of the backend with this name.
pub fn index_of(backends: &[Backend], name: &str) -> usize {
    backends
        .iter()
        .position(|b| b.name() == name)
        .unwrap_or_else(|| panic!("unknown backend {name:?}"))
}

/// `tether` with the backends, an admin interface on 127.0.<net>.1:0, and `extra` flags (probes
/// stay off unless `extra` picks one).
pub fn tether_with_admin(net: u8, backends: &[Backend], extra: &[&str]) -> Tether {
    let mut all = vec!["--admin".to_string(), format!("127.0.{net}.1:0")];
    all.extend(extra.iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    tether(net, backends, &all)
}

/// An `echo` session from `source`: what is written comes back.
pub fn echo_session(source: IpAddr, to: SocketAddr) -> std::net::TcpStream {
    let mut s = connect_from(source, to, DEADLINE).expect("connect");
    send_command(&mut s, "echo").expect("send echo");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Write a line on an echo session and check it comes back.
pub fn echo_roundtrip(s: &mut std::net::TcpStream, line: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut back = vec![0u8; line.len() + 1];
    s.read_exact(&mut back)?;
    if back != format!("{line}\n").as_bytes() {
        return Err(std::io::Error::other(format!("echo returned {back:?}")));
    }
    Ok(())
}

/// `GET path` of the admin API: 200 and JSON.
pub fn get_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let reply = http(admin, "GET", path, "").unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("GET {path}: {e}: {}", reply.body))
}

/// The admin API's backends as JSON objects.
pub fn api_backends(admin: SocketAddr) -> Vec<serde_json::Value> {
    match get_json(admin, "/api/backends") {
        serde_json::Value::Array(backends) => backends,
        other => panic!("not an array: {other}"),
    }
}

/// One backend's object from the admin API.
pub fn api_backend(admin: SocketAddr, name: &str) -> serde_json::Value {
    api_backends(admin)
        .into_iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name:?} in the API"))
}

/// The sum of the samples `name{labels...}` whose labels contain `label` (all of them if empty)
/// in Prometheus text.
pub fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter(|l| l.contains(label))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// One metric of a running tether with an admin address (see [`metric`]).
pub fn scrape(t: &Tether, name: &str, label: &str) -> f64 {
    metric(&http(t.admin(), "GET", "/metrics", "").expect("GET /metrics").body, name, label)
}

/// Whether the client at `source` is refused: the connection is reset (or closed) before any
/// byte of a backend's answer.
pub fn refused(source: IpAddr, to: SocketAddr) -> bool {
    use std::io::Read;
    let Ok(mut s) = connect_from(source, to, DEADLINE) else { return true };
    let _ = send_command(&mut s, "name");
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Err(_) => true,
        Ok(_) => reply.is_empty(),
    }
}

/// The process an upgrade started: stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Successor(pub Option<u32>);

impl Drop for Successor {
    fn drop(&mut self) {
        let Some(pid) = self.0 else { return };
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let gone = wait_until(DEADLINE, || {
            nix::sys::signal::kill(pid, None).is_err()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z"))
        });
        if !gone {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// A config file in the temp directory, named after the test's `tag` (unique in its file),
/// removed when dropped.
pub struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    pub fn new(tag: &str, text: &str) -> ConfigFile {
        let path =
            std::env::temp_dir().join(format!("tether-test-{}-{tag}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        ConfigFile(path)
    }

    pub fn write(&self, text: &str) {
        // Write then rename: a reload never reads a half-written file.
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
