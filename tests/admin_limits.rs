//! The admin listener can be neither exhausted nor stopped by its clients, and never takes the
//! descriptors the data path needs (issue 10). Each test is a regression test for a way the
//! admin server (tiny_http before) broke: one failed accept stopped it for good; idle
//! connections took a thread and two fds each without a deadline; the request line was read
//! without a bound.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// `--admin-max-conns` default.
const ADMIN_CAP: usize = 64;

/// The soft `RLIMIT_NOFILE` of process `pid` (proc(5), /proc/PID/limits).
fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// The lowest descriptor number process `pid` does not use: a soft limit of it makes the
/// process's next open fail with EMFILE.
fn lowest_free_fd(pid: u32) -> u64 {
    let used: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|fd| !used.contains(fd)).unwrap()
}

fn set_soft_nofile(pid: u32, soft: u64) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --pid {pid} --nofile={soft}: failed");
}

/// Send a `GET path` on an open connection (HTTP/1.0: the answer ends with the connection).
fn send_get(to: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&to, DEADLINE).unwrap();
    s.set_read_timeout(Some(DEADLINE * 2)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    s
}

fn status_of(reply: &[u8]) -> Option<u16> {
    std::str::from_utf8(reply).ok()?.split(' ').nth(1)?.parse().ok()
}

#[test]
fn the_admin_answers_again_after_running_out_of_fds() {
    let pool = backends(100, 1);
    let t = tether_with_admin(100, &pool, &[]);
    let pid = t.pid();
    assert_eq!(http(t.admin(), "GET", "/metrics", "").unwrap().status, 200);
    let soft = soft_nofile(pid);
    // From now on every new descriptor of tether's fails: accept(2) on the admin listener
    // gets EMFILE while clients wait in its backlog.
    set_soft_nofile(pid, lowest_free_fd(pid));
    let waiting: Vec<TcpStream> = (0..3).map(|_| send_get(t.admin(), "/metrics")).collect();
    let failed = t.wait_stderr(|l| l.contains("admin: accept failed"), DEADLINE);
    set_soft_nofile(pid, soft);
    assert!(failed, "accept never failed: {}", t.stderr_text());
    // The clients that waited are answered, and so are new ones: the accept loop never stopped.
    for mut s in waiting {
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        assert_eq!(status_of(&reply), Some(200), "{}", String::from_utf8_lossy(&reply));
    }
    let metrics = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    assert!(metric(&metrics, "tether_admin_accept_errors_total", "") >= 1.0, "{metrics}");
    assert_eq!(ask_name(client_ip(1), t.addr()).unwrap(), "b0");
}

#[test]
fn idle_admin_connections_never_starve_the_data_path() {
    // The reproduction: a 256-fd limit, where 148 idle admin connections used to make
    // every client of the data path fail. Now 500 take at most the cap of fds and no threads.
    let pool = backends(101, 1);
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=256:256", "--"]).arg(bin());
    cmd.args(["--listen", "127.0.101.1:0", "--admin", "127.0.101.1:0", "--workers", "1"]);
    cmd.args(["--health-check", "off", "--admin-timeout", "1m", "--splice", "off"]);
    cmd.args(backend_args(&pool));
    let t = Tether::start_command(cmd).expect("start tether under prlimit");
    // Counted before any admin connection: one just closed may hold its fd a moment longer.
    let (fds, threads) = (t.fd_count().unwrap(), t.threads().unwrap());
    let idle: Vec<TcpStream> =
        (0..500).filter_map(|_| TcpStream::connect_timeout(&t.admin(), DEADLINE).ok()).collect();
    assert_eq!(idle.len(), 500, "the kernel completes every handshake");
    // Tether takes the cap and closes the rest at once: poll until it has seen all 500.
    let settled = wait_until(DEADLINE, || t.fd_count().unwrap() >= fds + ADMIN_CAP);
    assert!(settled, "{} fds, {fds} before", t.fd_count().unwrap());
    // At most one more than the cap: a connection past it between accept and close.
    let held = t.fd_count().unwrap();
    assert!(held <= fds + ADMIN_CAP + 1, "{held} fds held, {fds} before");
    for i in 0..10 {
        assert_eq!(ask_name(client_ip(i), t.addr()).unwrap(), "b0", "client {i}");
    }
    let now = t.threads().unwrap();
    eprintln!("500 idle admin connections: {fds} -> {held} fds, {threads} -> {now} threads");
    assert!(now <= threads + 1, "{now} threads, {threads} before");
    drop(idle);
    // Once they are gone the admin answers, and says how many it turned away.
    let mut metrics = String::new();
    assert!(wait_until(DEADLINE, || {
        metrics = http(t.admin(), "GET", "/metrics", "").map(|r| r.body).unwrap_or_default();
        metric(&metrics, "tether_admin_connections", "") == 1.0
    }));
    let refused = metric(&metrics, "tether_admin_connections_refused_total", "");
    assert!(refused >= (500 - ADMIN_CAP) as f64, "{metrics}");
}

#[test]
fn a_200_mib_request_line_costs_no_more_than_the_head_cap() {
    let pool = backends(102, 1);
    let t = tether_with_admin(102, &pool, &[]);
    assert_eq!(http(t.admin(), "GET", "/metrics", "").unwrap().status, 200);
    let before = t.peak_rss_kib().unwrap();
    let mut s = TcpStream::connect_timeout(&t.admin(), DEADLINE).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = s.write(b"GET /").unwrap();
    while sent < 200 << 20 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            // Tether answered and closed: the rest is refused.
            Err(_) => break,
        }
    }
    assert!(sent < 200 << 20, "tether read all of a 200 MiB request line");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply); // a reset after the answer is fine
    if !reply.is_empty() {
        assert_eq!(status_of(&reply), Some(431), "{}", String::from_utf8_lossy(&reply));
    }
    let grew = t.peak_rss_kib().unwrap().saturating_sub(before);
    eprintln!(
        "request line: {sent} bytes sent before the close, peak RSS +{grew} KiB, reply {:?}",
        status_of(&reply)
    );
    assert!(grew < 4 * 1024, "peak RSS grew by {grew} KiB for one request line");
    assert_eq!(http(t.admin(), "GET", "/metrics", "").unwrap().status, 200);
}

/// How long until tether closes `s`, writing one byte of `trickle` every 100 ms meanwhile
/// (nothing if empty); `None` if it is still open after `limit`.
fn closed_after(s: &mut TcpStream, trickle: &[u8], limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 4096];
    let mut next = 0;
    while start.elapsed() < limit {
        if next < trickle.len() {
            if s.write_all(&trickle[next..next + 1]).is_err() {
                return Some(start.elapsed());
            }
            next += 1;
        }
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {} // an answer (408, say): the close follows
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn slow_and_idle_admin_clients_are_cut_at_the_deadline() {
    let pool = backends(103, 1);
    let t = tether_with_admin(103, &pool, &["--admin-timeout", "2s"]);
    let limit = Duration::from_secs(20);
    let connect = || TcpStream::connect_timeout(&t.admin(), DEADLINE).unwrap();
    // A slowloris: a header a byte at a time, never finished.
    let mut slow = connect();
    let trickle: Vec<u8> =
        b"GET / HTTP/1.1\r\nHost: x\r\n".iter().chain(&[b'a'; 400]).copied().collect();
    let took = closed_after(&mut slow, &trickle, limit).expect("slowloris never cut");
    assert!(took >= Duration::from_secs(1), "cut after {took:?}, before the deadline");
    // A connection that never says anything.
    let took = closed_after(&mut connect(), b"", limit).expect("silent connection never cut");
    assert!(took >= Duration::from_secs(1), "cut after {took:?}");
    // A body that never arrives in full: answered 408.
    let mut body = connect();
    write!(body, "POST /api/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{").unwrap();
    let took = closed_after(&mut body, &[b' '; 40], limit).expect("slow body never cut");
    assert!(took >= Duration::from_secs(1), "cut after {took:?}");
    // A keep-alive connection left idle after its answer.
    let mut kept = connect();
    write!(kept, "GET /api/backends HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let took = closed_after(&mut kept, b"", limit).expect("idle keep-alive never cut");
    assert!(took >= Duration::from_secs(1), "cut after {took:?}");
    let metrics = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    assert!(metric(&metrics, "tether_admin_timeouts_total", "") >= 3.0, "{metrics}");
}

#[test]
fn the_admin_connections_are_kept_out_of_the_session_budget() {
    // 100 fds: 12 reserved, so 44 sessions fit; an admin takes 64 + 4 more, leaving room for 10.
    let pool = backends(104, 1);
    let run = |admin: bool| {
        let mut args = vec!["--nofile=100:100", "--", bin().to_str().unwrap()];
        args.extend(["--listen", "127.0.104.1:0", "--max-conns", "40", "--health-check", "off"]);
        if admin {
            args.extend(["--admin", "127.0.104.1:0"]);
        }
        let backend = format!("{}", pool[0].addr());
        args.extend(["--backend", &backend]);
        let mut cmd = Command::new("prlimit");
        cmd.args(&args);
        cmd
    };
    let t = Tether::start_command(run(false)).expect("40 sessions fit in 100 fds");
    drop(t);
    let mut cmd = run(true);
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--max-conns 40: at most 10 fit"), "{stderr}");
    assert!(stderr.contains("80 reserved"), "{stderr}");
}
