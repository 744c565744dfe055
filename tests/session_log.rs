//! The session log (issue 16): `--log-sessions` writes one line per finished TCP session, per
//! expired UDP flow and per refused client to stdout, in logfmt or JSON, with how it ended.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown};

use common::*;

/// A logfmt line's pairs (values here are plain words: no quoting needed).
fn pairs(line: &str) -> HashMap<String, String> {
    line.split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The session lines of `t` so far (stdout after the `ready` line).
fn lines(t: &Tether) -> Vec<String> {
    t.stdout_lines().into_iter().filter(|l| l.starts_with("time=") || l.starts_with('{')).collect()
}

/// Waits for the line of client `ip` whose `end` is `end`, and returns its pairs.
fn line_of(t: &Tether, ip: &str, end: &str) -> HashMap<String, String> {
    let mut found = None;
    let want = |p: &HashMap<String, String>| {
        p.get("client").is_some_and(|c| c.starts_with(&format!("{ip}:")))
            && p.get("end").map(String::as_str) == Some(end)
    };
    let ok = wait_until(DEADLINE, || {
        found = lines(t).iter().map(|l| pairs(l)).find(|p| want(p));
        found.is_some()
    });
    assert!(ok, "no end={end} line for {ip} in:\n{}", lines(t).join("\n"));
    found.unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn every_tcp_ending_and_refusal_has_its_line() {
    let pool = backends(157, 2);
    let t = tether_with_admin(
        157,
        &pool,
        &[
            "--log-sessions",
            "--idle-timeout",
            "2s",
            "--deny",
            "127.0.157.66/32",
            "--max-conns-per-source",
            "1",
        ],
    );

    // The client closes first: echo 1000 bytes, shut down, read the echo to its end.
    let mut s = connect_from(ip("127.0.157.100"), t.addr(), DEADLINE).unwrap();
    send_command(&mut s, "echo").unwrap();
    s.write_all(&[7u8; 1000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), 1000);
    drop(s);
    let first = line_of(&t, "127.0.157.100", "client_fin");
    assert_eq!(first["protocol"], "tcp");
    assert_eq!(first["service"], "default");
    assert_eq!(first["bytes_in"], "1005", "the command line and the payload");
    assert_eq!(first["bytes_out"], "1000");
    assert_eq!(first["pinned"], "false", "a new client");
    let name = &first["backend"];
    let backend = &pool[index_of(&pool, name)];
    assert_eq!(first["backend_address"], backend.addr().to_string());
    assert!(first["time"].ends_with('Z') && first["time"].len() == 24, "{}", first["time"]);
    assert!(first["duration_ms"].parse::<u64>().is_ok());

    // The same client again, pinned now; the backend closes first (`name`).
    assert_eq!(ask_name(ip("127.0.157.100"), t.addr()).unwrap(), *name);
    let again = line_of(&t, "127.0.157.100", "backend_fin");
    assert_eq!(again["pinned"], "true");
    assert_eq!(&again["backend"], name);

    // Resets, by the backend and by the client.
    let mut s = connect_from(ip("127.0.157.101"), t.addr(), DEADLINE).unwrap();
    send_command(&mut s, "reset").unwrap();
    let _ = s.read_to_end(&mut Vec::new());
    line_of(&t, "127.0.157.101", "backend_reset");
    // Established (the backend's greeting came back) before the reset.
    let (s, _) = hold(ip("127.0.157.102"), t.addr()).unwrap();
    send_reset(s).unwrap();
    line_of(&t, "127.0.157.102", "client_reset");

    // Idle for the idle timeout (2 s).
    let (held, _) = hold(ip("127.0.157.103"), t.addr()).unwrap();
    let idle = line_of(&t, "127.0.157.103", "idle_timeout");
    let ms: u64 = idle["duration_ms"].parse().unwrap();
    assert!((2000..20_000).contains(&ms), "{ms}");
    drop(held);

    // Refused: by the ACL, by the per-source limit.
    let _ = ask_name(ip("127.0.157.66"), t.addr());
    let denied = line_of(&t, "127.0.157.66", "denied");
    assert_eq!(denied["backend"], "-");
    assert_eq!(denied["bytes_in"], "0");
    let (one, _) = hold(ip("127.0.157.104"), t.addr()).unwrap();
    let _ = ask_name(ip("127.0.157.104"), t.addr());
    line_of(&t, "127.0.157.104", "limited");
    drop(one);

    // The lines and the metric agree.
    let written = scrape(&t, "tether_session_log_lines_total", "");
    assert!(written >= lines(&t).len() as f64 - 0.5, "{written}");
    assert_eq!(scrape(&t, "tether_session_log_dropped_total", ""), 0.0);
}

#[test]
fn json_lines_are_objects_with_every_key() {
    let pool = backends(158, 1);
    let t = tether(158, &pool, &["--log-sessions", "--log-format", "json"]);
    assert_eq!(ask_name(ip("127.0.158.100"), t.addr()).unwrap(), "b0");
    let mut line = None;
    assert!(wait_until(DEADLINE, || {
        line = lines(&t).into_iter().next();
        line.is_some()
    }));
    let v: serde_json::Value = serde_json::from_str(&line.unwrap()).expect("one JSON object");
    for key in [
        "time",
        "protocol",
        "service",
        "client",
        "backend",
        "backend_address",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "end",
        "pinned",
    ] {
        assert!(v.get(key).is_some(), "{key} in {v}");
    }
    assert_eq!(v["end"], "backend_fin");
    assert_eq!(v["backend"], "b0");
    assert_eq!(v["bytes_in"], 5);
    assert_eq!(v["pinned"], false);
}

#[test]
fn an_expired_udp_flow_has_its_line() {
    let ip_b = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 159, 10));
    let backend = UdpBackend::start("u0", std::net::SocketAddr::new(ip_b, 0)).unwrap();
    let args = no_probes(&[
        "--listen".to_string(),
        "127.0.159.1:0".into(),
        "--protocol".into(),
        "udp".into(),
        "--backend".into(),
        format!("{},name=u0", backend.addr()),
        "--udp-idle-timeout".into(),
        "1s".into(),
        "--log-sessions".into(),
    ]);
    let t = Tether::start(bin(), &args).expect("start tether");
    let socket = udp_client(ip("127.0.159.100")).unwrap();
    let (reply, _) =
        udp_ask(&socket, t.udp_addr(), b"name", std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(reply, b"u0");
    let flow = line_of(&t, "127.0.159.100", "idle_timeout");
    assert_eq!(flow["protocol"], "udp");
    assert_eq!(flow["backend"], "u0");
    assert_eq!(flow["bytes_in"], "4");
    assert_eq!(flow["bytes_out"], "2");
    let ms: u64 = flow["duration_ms"].parse().unwrap();
    assert!(ms >= 1000, "{ms}");
}

#[test]
fn without_the_flag_nothing_is_logged() {
    let pool = backends(160, 1);
    let t = tether_with_admin(160, &pool, &[]);
    assert_eq!(ask_name(ip("127.0.160.100"), t.addr()).unwrap(), "b0");
    assert_eq!(ask_name(ip("127.0.160.100"), t.addr()).unwrap(), "b0");
    // The closes are counted before anything else could show: then stdout is checked.
    assert!(wait_until(DEADLINE, || scrape_closed(&t) >= 2.0));
    assert!(lines(&t).is_empty(), "{:?}", lines(&t));
    let metrics = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    assert!(!metrics.contains("tether_session_log_lines_total"));
}

fn scrape_closed(t: &Tether) -> f64 {
    scrape(t, "tether_sessions_closed_total", "")
}

#[test]
fn no_backend_and_the_grace_period_have_their_lines_and_every_line_is_written_at_exit() {
    let pool = backends(163, 1);
    let mut t = tether_with_admin(163, &pool, &["--log-sessions", "--grace", "1s"]);
    // A client held open, then the only backend in maintenance: the next client has nowhere
    // to go.
    let (held, _) = hold(ip("127.0.163.100"), t.addr()).unwrap();
    let r = http(t.admin(), "PUT", "/api/services/default/backends/b0", r#"{"state":"maint"}"#);
    assert_eq!(r.unwrap().status, 200);
    let _ = ask_name(ip("127.0.163.101"), t.addr());
    let refused = line_of(&t, "127.0.163.101", "no_backend");
    assert_eq!(refused["backend"], "-");
    // SIGTERM: the held session is cut when the grace period ends, and its line is written
    // before the process exits.
    t.signal(Signal::SIGTERM).unwrap();
    assert!(t.wait_exit(DEADLINE).is_some_and(|s| s.success()));
    let cut = line_of(&t, "127.0.163.100", "grace");
    assert_eq!(cut["backend"], "b0");
    let ms: u64 = cut["duration_ms"].parse().unwrap();
    assert!(ms >= 1000, "{ms}");
    drop(held);
}
