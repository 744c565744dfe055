//! A backend that stops or never answers costs its clients nothing but a move; nobody else moves.

mod common;

use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn stopped_backend_clients_move_and_nobody_else_does() {
    let mut pool = backends(10, 3);
    let t = tether(10, &pool, &[]);
    let sources: Vec<_> = (0..90).map(client_ip).collect();
    let before: Vec<String> = sources.iter().map(|&s| ask_name(s, t.addr()).unwrap()).collect();
    let victim = before[0].clone();
    let victim_clients = before.iter().filter(|n| **n == victim).count();
    assert!(victim_clients > 0);

    let v = index_of(&pool, &victim);
    pool[v].stop();
    // Zero failed connections: the first connect to the stopped backend is refused and retried.
    for (i, &s) in sources.iter().enumerate() {
        let now = ask_name(s, t.addr()).unwrap_or_else(|e| panic!("source {s} failed: {e}"));
        if before[i] == victim {
            assert_ne!(now, victim, "source {s} still on the stopped backend");
        } else {
            assert_eq!(now, before[i], "source {s} moved although its backend is up");
        }
    }
    // Moved clients stay where they were re-pinned.
    for (i, &s) in sources.iter().enumerate() {
        if before[i] == victim {
            let again = ask_name(s, t.addr()).unwrap();
            assert_ne!(again, victim);
        }
    }
}

#[test]
fn blackholed_backend_times_out_and_clients_are_served_elsewhere() {
    let hole = blackhole("127.0.11.10".parse().unwrap()).expect("black hole");
    let good = Backend::start("good", "127.0.11.11:0".parse().unwrap()).unwrap();
    let args = vec![
        "--listen".to_string(),
        "127.0.11.1:0".into(),
        "--backend".into(),
        format!("{},name=hole", hole.addr()),
        "--backend".into(),
        format!("{},name=good", good.addr()),
        "--connect-timeout".into(),
        "300ms".into(),
    ];
    let t = Tether::start(bin(), no_probes(&args)).unwrap();
    let mut slow = 0;
    for i in 0..20 {
        let started = Instant::now();
        assert_eq!(ask_name(client_ip(i), t.addr()).unwrap(), "good");
        if started.elapsed() >= Duration::from_millis(290) {
            slow += 1;
        }
    }
    // About half the sources start on the black hole: at least one paid the timeout, and then
    // the passive mark kept the others off it.
    assert!(slow >= 1, "no client went through the connect timeout");
}

#[test]
fn client_is_reset_when_no_backend_can_take_it() {
    let hole = blackhole("127.0.12.10".parse().unwrap()).expect("black hole");
    let dead = {
        // A port nobody listens on any more: connects are refused.
        let l = std::net::TcpListener::bind("127.0.12.11:0").unwrap();
        l.local_addr().unwrap()
    };
    let args = vec![
        "--listen".to_string(),
        "127.0.12.1:0".into(),
        "--backend".into(),
        hole.addr().to_string(),
        "--backend".into(),
        dead.to_string(),
        "--connect-timeout".into(),
        "300ms".into(),
    ];
    let t = Tether::start(bin(), no_probes(&args)).unwrap();
    for i in 0..3 {
        let started = Instant::now();
        let mut s = connect_from(client_ip(i), t.addr(), DEADLINE).unwrap();
        send_command(&mut s, "name").unwrap();
        let mut buf = Vec::new();
        let err = s.read_to_end(&mut buf).expect_err("a reset, not a clean close");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
        assert!(buf.is_empty());
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }
    // tether itself is fine and serves again once a backend is there.
    assert!(t.stderr_text().find("panicked").is_none());
}
