//! The control side, black-box: admin API, drain and maint semantics, health checks, metrics.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Where each source lands now.
fn survey_names(sources: &[IpAddr], t: &Tether) -> Vec<String> {
    sources
        .iter()
        .map(|&s| ask_name(s, t.addr()).unwrap_or_else(|e| panic!("source {s}: {e}")))
        .collect()
}

fn put(admin: std::net::SocketAddr, path: &str, body: &str) -> HttpReply {
    http(admin, "PUT", path, body).expect("PUT")
}

fn error_of(reply: &HttpReply) -> String {
    let v: Value = serde_json::from_str(&reply.body).expect("JSON error body");
    v["error"].as_str().expect("an \"error\" string").to_string()
}

#[test]
fn api_lists_changes_adds_and_removes_backends() {
    let pool = backends(60, 3);
    let t = tether_with_admin(60, &pool, &[]);
    let admin = t.admin();
    let list = api_backends(admin);
    assert_eq!(list.len(), 3);
    for (b, want) in list.iter().zip(&pool) {
        assert_eq!(b["service"], "default");
        assert_eq!(b["name"], want.name());
        assert_eq!(b["address"], want.addr().to_string());
        assert_eq!(b["state"], "ready");
        assert_eq!(b["health"], "up");
        assert_eq!(b["weight"], 1);
        assert_eq!(b["sessions"], 0);
        assert_eq!(b["sticky_clients"], 0);
    }

    // Weight.
    let r = put(admin, "/api/services/default/backends/b1", r#"{"weight":3}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(api_backend(admin, "b1")["weight"], 3);

    // Errors change nothing and say why, as JSON.
    let cases = [
        ("PUT", "/api/services/default/backends/nope", r#"{"weight":2}"#, 404),
        ("PUT", "/api/services/nope/backends/b1", r#"{"weight":2}"#, 404),
        ("PUT", "/api/services/default/backends/b1", r#"{"state":"sleepy"}"#, 400),
        ("PUT", "/api/services/default/backends/b1", r#"{"weight":0}"#, 400),
        ("PUT", "/api/services/default/backends/b1", r#"{"weight":2,"state":"bad"}"#, 400),
        ("PUT", "/api/services/default/backends/b1", r#"{"colour":"red"}"#, 400),
        ("PUT", "/api/services/default/backends/b1", "not json", 400),
        ("PUT", "/api/services/default/backends/b1", "{}", 400),
        ("POST", "/api/services/default/backends", r#"{"address":"nope"}"#, 400),
        ("POST", "/api/services/default/backends", r#"{"weight":1}"#, 400),
        (
            "POST",
            "/api/services/default/backends",
            r#"{"address":"127.0.60.20:9","name":"b0"}"#,
            409,
        ),
        ("DELETE", "/api/services/default/backends/nope", "", 404),
        ("GET", "/api/nothing", "", 404),
        ("DELETE", "/api/backends", "", 405),
    ];
    for (method, path, body, status) in cases {
        let r = http(admin, method, path, body).unwrap();
        assert_eq!(r.status, status, "{method} {path} {body}: {}", r.body);
        assert!(r.content_type.starts_with("application/json"), "{method} {path}");
        assert!(!error_of(&r).is_empty());
    }
    let after = api_backends(admin);
    assert_eq!(after.len(), 3);
    assert_eq!(api_backend(admin, "b1")["weight"], 3);
    assert!(after.iter().all(|b| b["state"] == "ready"));

    // Add a backend: new clients reach it.
    let extra = Backend::start("b3", "127.0.60.13:0".parse().unwrap()).unwrap();
    let body = format!(r#"{{"address":"{}","weight":2,"name":"b3"}}"#, extra.addr());
    let r = http(admin, "POST", "/api/services/default/backends", &body).unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(api_backends(admin).len(), 4);
    let sources: Vec<IpAddr> = (0..120).map(client_ip).collect();
    let names = survey_names(&sources, &t);
    assert!(names.iter().any(|n| n == "b3"), "no new client reached the added backend");

    // Remove it: its clients move, no one else does.
    let r = http(admin, "DELETE", "/api/services/default/backends/b3", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(api_backends(admin).len(), 3);
    let again = survey_names(&sources, &t);
    for (i, (before, now)) in names.iter().zip(&again).enumerate() {
        if before == "b3" {
            assert_ne!(now, "b3", "source {i} still reaches the removed backend");
        } else {
            assert_eq!(before, now, "source {i} moved though its backend stayed");
        }
    }
}

#[test]
fn drain_keeps_pinned_clients_and_open_sessions_and_takes_no_new_ones() {
    let pool = backends(61, 3);
    let t = tether_with_admin(61, &pool, &[]);
    let admin = t.admin();
    let old: Vec<IpAddr> = (0..90).map(client_ip).collect();
    let before = survey_names(&old, &t);
    let victim = before[0].clone();
    let pinned = before.iter().filter(|n| **n == victim).count();
    // An open session on the victim, from one of its clients.
    let mut open = echo_session(old[0], t.addr());
    echo_roundtrip(&mut open, "before").unwrap();

    let r = put(admin, &format!("/api/services/default/backends/{victim}"), r#"{"state":"drain"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let view = api_backend(admin, &victim);
    assert_eq!(view["state"], "drain");
    assert_eq!(view["sessions"], 1, "drain progress counts the open session");
    assert_eq!(view["sticky_clients"], pinned as u64, "and the pinned clients");

    // Pinned clients keep their backend; new clients never get it.
    assert_eq!(survey_names(&old, &t), before);
    let new: Vec<IpAddr> = (200..400).map(client_ip).collect();
    let names = survey_names(&new, &t);
    assert!(!names.contains(&victim), "a new client reached the draining backend");
    echo_roundtrip(&mut open, "during").unwrap();
    drop(open);
    assert!(
        wait_until(DEADLINE, || api_backend(admin, &victim)["sessions"] == 0),
        "the drained session was never counted out"
    );
}

#[test]
fn maint_moves_pinned_clients_keeps_open_sessions_and_ready_moves_no_one_back() {
    let pool = backends(62, 3);
    let t = tether_with_admin(62, &pool, &[]);
    let admin = t.admin();
    let sources: Vec<IpAddr> = (0..90).map(client_ip).collect();
    let before = survey_names(&sources, &t);
    let victim = before[0].clone();
    let mut open = echo_session(sources[0], t.addr());
    echo_roundtrip(&mut open, "before").unwrap();

    let path = format!("/api/services/default/backends/{victim}");
    assert_eq!(put(admin, &path, r#"{"state":"maint"}"#).status, 200);
    let during = survey_names(&sources, &t);
    for (i, (b, d)) in before.iter().zip(&during).enumerate() {
        if *b == victim {
            assert_ne!(*d, victim, "source {i} still reaches the backend in maintenance");
        } else {
            assert_eq!(b, d, "source {i} moved though its backend is ready");
        }
    }
    echo_roundtrip(&mut open, "during").unwrap();

    // Back to ready: the moved clients stay where they were re-pinned.
    assert_eq!(put(admin, &path, r#"{"state":"ready"}"#).status, 200);
    assert_eq!(survey_names(&sources, &t), during);
    echo_roundtrip(&mut open, "after").unwrap();
}

#[test]
fn health_checks_take_a_dead_backend_down_and_bring_it_back_without_failing_anyone() {
    let mut pool = backends(63, 3);
    let interval = Duration::from_millis(300);
    let (rise, fall) = (2u32, 3u32);
    let t = tether_with_admin(
        63,
        &pool,
        &[
            "--health-check",
            "tcp",
            "--health-interval",
            "300ms",
            "--health-timeout",
            "200ms",
            "--health-rise",
            "2",
            "--health-fall",
            "3",
        ],
    );
    let admin = t.admin();
    let sources: Vec<IpAddr> = (0..60).map(client_ip).collect();
    let before = survey_names(&sources, &t);
    let victim = before[0].clone();
    let v = index_of(&pool, &victim);
    let addr = pool[v].addr();

    pool[v].stop();
    let stopped = Instant::now();
    // Zero failed client connections while it goes down (refused connects are retried).
    let mut moved = Vec::new();
    while api_backend(admin, &victim)["health"] != "down" {
        assert!(stopped.elapsed() < DEADLINE, "never marked down");
        moved = survey_names(&sources, &t);
    }
    let took = stopped.elapsed();
    // fall x interval, plus one interval of phase and scheduling slack on a loaded machine.
    let bound = interval * (fall + 1) + Duration::from_secs(3);
    assert!(took <= bound, "marked down after {took:?}, bound {bound:?}");
    if moved.is_empty() {
        moved = survey_names(&sources, &t);
    }
    for (i, (b, m)) in before.iter().zip(&moved).enumerate() {
        assert_ne!(*m, victim, "source {i} on a dead backend");
        if *b != victim {
            assert_eq!(b, m, "source {i} moved though its backend is up");
        }
    }

    // It comes back: up within rise x interval; moved clients stay where they are.
    let back = Backend::start(&victim, addr).expect("restart the backend on its address");
    let restarted = Instant::now();
    assert!(
        wait_until(DEADLINE, || api_backend(admin, &victim)["health"] == "up"),
        "never marked up again"
    );
    let took = restarted.elapsed();
    let bound = interval * (rise + 1) + Duration::from_secs(3);
    assert!(took <= bound, "marked up after {took:?}, bound {bound:?}");
    assert_eq!(survey_names(&sources, &t), moved, "recovery moved live clients back");
    let fresh: Vec<IpAddr> = (300..500).map(client_ip).collect();
    assert!(
        survey_names(&fresh, &t).contains(&victim),
        "no new client reached the recovered backend"
    );
    drop(back);

    let events = http(admin, "GET", "/api/events", "").unwrap();
    let events: Vec<Value> = serde_json::from_str(&events.body).unwrap();
    let texts: Vec<&str> = events.iter().filter_map(|e| e["text"].as_str()).collect();
    assert!(texts.iter().any(|e| e.contains(&format!("{victim}: health down"))), "{texts:?}");
    assert!(texts.iter().any(|e| e.contains(&format!("{victim}: health up"))), "{texts:?}");
    let metrics = http(admin, "GET", "/metrics", "").unwrap().body;
    assert!(metric(&metrics, "tether_health_transitions_total", "") >= 2.0);
}

/// Every line is a comment (`# HELP`/`# TYPE`) or a sample: a metric name, optional labels
/// `{k="v",...}`, a space and a number. Each family is typed once, before its samples.
fn check_prometheus_text(text: &str) {
    let mut typed = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(
                typed.insert(name.to_string(), kind.to_string()).is_none(),
                "typed twice: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        assert!(typed.contains_key(name), "sample before its # TYPE: {line:?}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}'));
            let inner = inner.unwrap_or_else(|| panic!("bad labels in {line:?}"));
            for pair in inner.split("\",") {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label {line:?}"));
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line:?}");
                assert!(!v.trim_end_matches('"').contains('"'), "unescaped quote in {line:?}");
            }
        }
    }
    assert!(typed.len() > 20, "too few metric families: {}", typed.len());
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let pool = backends(64, 2);
    let t = tether_with_admin(64, &pool, &[]);
    let admin = t.admin();
    let first = http(admin, "GET", "/metrics", "").unwrap();
    assert_eq!(first.status, 200);
    assert!(first.content_type.starts_with("text/plain"), "{}", first.content_type);
    check_prometheus_text(&first.body);
    let accepted = metric(&first.body, "tether_sessions_accepted_total", "");
    let sessions = metric(&first.body, "tether_backend_sessions_total", "");
    let sources: Vec<IpAddr> = (0..20).map(client_ip).collect();
    let names = survey_names(&sources, &t);
    let mut s = echo_session(client_ip(0), t.addr());
    echo_roundtrip(&mut s, "hello").unwrap();
    let second = http(admin, "GET", "/metrics", "").unwrap().body;
    check_prometheus_text(&second);
    assert_eq!(metric(&second, "tether_sessions_accepted_total", ""), accepted + 21.0);
    assert_eq!(metric(&second, "tether_backend_sessions_total", ""), sessions + 21.0);
    // Sessions that answered are counted out once both sides closed, a moment later.
    assert!(wait_until(DEADLINE, || {
        let now = http(admin, "GET", "/metrics", "").unwrap().body;
        metric(&now, "tether_sessions_active", "") == 1.0
    }));
    assert!(metric(&second, "tether_bytes_in_total", "") > 0.0);
    let b0 = names.iter().filter(|n| *n == "b0").count() as f64;
    let b0_label = "backend=\"b0\"";
    assert!(metric(&second, "tether_backend_sessions_total", b0_label) >= b0);
    assert!(metric(&second, "tether_sticky_entries", "service=\"default\"") >= 20.0);
    assert_eq!(metric(&second, "tether_backend_up", b0_label), 1.0);
    // Both workers' shares add up to every accepted client (F10: the spread is visible).
    let per_worker = metric(&second, "tether_worker_accepted_total", "worker=");
    assert_eq!(per_worker, metric(&second, "tether_sessions_accepted_total", ""));
    assert!(second.contains("tether_worker_accepted_total{worker=\"1\"}"));
}

#[test]
fn sticky_endpoint_says_where_a_client_is_pinned() {
    let pool = backends(65, 3);
    let t = tether_with_admin(65, &pool, &[]);
    let admin = t.admin();
    let ip = client_ip(7);
    let name = ask_name(ip, t.addr()).unwrap();
    let sticky = || {
        let r = http(admin, "GET", &format!("/api/sticky?client={ip}"), "").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str::<Value>(&r.body).unwrap()
    };
    // The entry starts expiring once tether has seen the session close.
    assert!(wait_until(DEADLINE, || sticky()["sessions"] == 0), "{}", sticky());
    let v = sticky();
    assert_eq!(v["backend"], name.as_str());
    assert_eq!(v["service"], "default");
    assert!(v["expires_in_ms"].as_u64().unwrap() > 0);
    let r = http(admin, "GET", "/api/sticky?client=127.9.9.9&service=default", "").unwrap();
    assert_eq!(serde_json::from_str::<Value>(&r.body).unwrap()["backend"], Value::Null);
    for (query, status) in [("client=nope", 400), ("", 400), ("client=127.0.0.1&service=x", 404)] {
        let r = http(admin, "GET", &format!("/api/sticky?{query}"), "").unwrap();
        assert_eq!(r.status, status, "{query}: {}", r.body);
        assert!(!error_of(&r).is_empty());
    }
}

#[test]
fn a_non_loopback_admin_address_needs_an_explicit_flag() {
    let exit = run_to_exit(
        bin(),
        ["--listen", "127.0.66.1:0", "--backend", "127.0.66.10:9", "--admin", "0.0.0.0:0"],
        DEADLINE,
    )
    .unwrap();
    assert_eq!(exit.status.code(), Some(2));
    assert!(
        exit.stderr.contains("--admin \"0.0.0.0:0\": not a loopback address"),
        "{}",
        exit.stderr
    );
}

#[test]
fn on_down_kill_resets_the_open_sessions_of_a_backend_put_in_maint() {
    let pool = backends(68, 2);
    let t = tether_with_admin(68, &pool, &["--on-down", "kill"]);
    let admin = t.admin();
    let sources: Vec<IpAddr> = (0..40).map(client_ip).collect();
    let names = survey_names(&sources, &t);
    let on = |name: &str| sources.iter().zip(&names).find(|(_, n)| *n == name).unwrap().0;
    let (victim_src, other_src) = (*on("b0"), *on("b1"));
    let mut victim = echo_session(victim_src, t.addr());
    let mut other = echo_session(other_src, t.addr());
    echo_roundtrip(&mut victim, "before").unwrap();
    echo_roundtrip(&mut other, "before").unwrap();
    let r = put(admin, "/api/services/default/backends/b0", r#"{"state":"maint"}"#);
    assert_eq!(r.status, 200);
    // The victim's session is cut with a reset (not a clean end); the other one runs on.
    let mut buf = [0u8; 16];
    let cut = std::io::Read::read(&mut victim, &mut buf);
    assert!(
        matches!(&cut, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset, got {cut:?}"
    );
    echo_roundtrip(&mut other, "after").unwrap();
    assert!(wait_until(DEADLINE, || api_backend(admin, "b0")["sessions"] == 0));
    // Its client reconnects elsewhere at once.
    assert_eq!(ask_name(victim_src, t.addr()).unwrap(), "b1");
    let metrics = http(admin, "GET", "/metrics", "").unwrap().body;
    assert!(metrics.contains("tether_sessions_killed_total 1"), "{metrics}");
}

#[test]
fn a_stalled_admin_client_holds_only_its_own_request() {
    let pool = backends(69, 1);
    let mut t = tether_with_admin(69, &pool, &[]);
    let admin = t.admin();
    // Requests that promise a body and never send it, on every method.
    let stalled: Vec<std::net::TcpStream> =
        ["GET /metrics", "POST /api/reload", "PUT /api/services/default/backends/b0"]
            .iter()
            .map(|line| {
                let mut s = std::net::TcpStream::connect(admin).unwrap();
                std::io::Write::write_all(
                    &mut s,
                    format!("{line} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
                        .as_bytes(),
                )
                .unwrap();
                s
            })
            .collect();
    for _ in 0..5 {
        assert_eq!(http(admin, "GET", "/api/backends", "").unwrap().status, 200);
    }
    // A body declared over the cap is refused before any of it is read.
    let mut big = std::net::TcpStream::connect(admin).unwrap();
    big.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = "PUT /api/services/default/backends/b0 HTTP/1.0\r\nContent-Length: 20000\r\n\r\n";
    std::io::Write::write_all(&mut big, head.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut big, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 413") || answer.starts_with("HTTP/1.0 413"), "{answer}");
    // And the stalled clients do not keep tether from stopping.
    t.signal(Signal::SIGTERM).unwrap();
    assert!(t.wait_exit(DEADLINE).is_some(), "tether hung on a stalled admin client");
    drop(stalled);
}

#[test]
fn status_names_the_version_the_pid_and_the_start() {
    let pool = backends(113, 1);
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let t = tether_with_admin(113, &pool, &[]);
    let body = http(t.admin(), "GET", "/api/status", "").unwrap().body;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(status["version"].as_str().unwrap().starts_with(env!("CARGO_PKG_VERSION")), "{body}");
    assert_eq!(status["pid"], t.pid());
    let started = status["started_unix_ms"].as_u64().unwrap();
    assert!(started + 1_000 >= before.as_millis() as u64, "{body}");
    assert!(t.stderr_text().contains(&format!("(pid {})", t.pid())), "{}", t.stderr_text());
}
