//! Peers (issue 14), on loopback: a pin made on one instance reaches another within a second,
//! and a peer with the wrong key or one that sends garbage is refused, reported, and changes
//! nothing. (The cluster behind real ECMP, in namespaces, is scripts/cluster.sh's.)

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use testkit::hold;

/// A key file with `hex` in a directory of its own.
fn key_file(tag: &str, hex: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-peers-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("peer.key");
    std::fs::write(&path, format!("{hex}\n")).unwrap();
    path
}

const KEY: &str = "8f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0";
const OTHER_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000001";

fn pinned_to(admin: SocketAddr, client: IpAddr) -> Option<String> {
    get_json(admin, &format!("/api/sticky?client={client}"))["backend"].as_str().map(String::from)
}

#[test]
fn a_pin_moved_on_one_instance_is_followed_by_its_peer_within_a_second() {
    let pool = backends(140, 3);
    let key = key_file("follow", KEY);
    let key = key.to_str().unwrap();
    // B takes changes from anyone who holds the key; A sends it its own.
    let b = tether_with_admin(
        140,
        &pool,
        &["--name", "b", "--peer-listen", "127.0.140.2:0", "--peer-key-file", key],
    );
    let to_b = format!("b={}", b.peer_addr());
    let a =
        tether_with_admin(140, &pool, &["--name", "a", "--peer", &to_b, "--peer-key-file", key]);
    let connected =
        wait_until(DEADLINE, || get_json(a.admin(), "/api/peers")[0]["state"] == "connected");
    assert!(connected, "{}", get_json(a.admin(), "/api/peers"));
    // 30 clients: where each goes on A, and B agrees (same pool and seed).
    let clients: Vec<IpAddr> =
        (0..30).map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, 140, 10 + i))).collect();
    let first: Vec<String> = clients.iter().map(|&c| ask_name(c, a.addr()).unwrap()).collect();
    for (&c, name) in clients.iter().zip(&first) {
        assert_eq!(&ask_name(c, b.addr()).unwrap(), name, "the instances disagree on {c}");
    }
    // b0 in maintenance on A only: its clients move there, to their next backend.
    let maint = http(a.admin(), "PUT", "/api/services/default/backends/b0", r#"{"state":"maint"}"#);
    assert_eq!(maint.unwrap().status, 200);
    let moved: Vec<(IpAddr, String)> = clients
        .iter()
        .zip(&first)
        .filter(|(_, n)| n.as_str() == "b0")
        .map(|(&c, _)| (c, ask_name(c, a.addr()).unwrap()))
        .collect();
    assert!(!moved.is_empty(), "no client of 30 was on b0: {first:?}");
    let at = Instant::now();
    // B never saw b0 in maintenance: only the shared pins can send these clients elsewhere.
    let followed = wait_until(DEADLINE, || {
        moved.iter().all(|(c, to)| pinned_to(b.admin(), *c).as_deref() == Some(to.as_str()))
    });
    let lag = at.elapsed();
    assert!(
        followed,
        "B's pins: {:?}",
        moved.iter().map(|(c, _)| pinned_to(b.admin(), *c)).collect::<Vec<_>>()
    );
    eprintln!("{} re-pins on A reached B in {lag:?}", moved.len());
    assert!(lag < Duration::from_secs(1), "{lag:?}");
    for (c, to) in &moved {
        assert_eq!(&ask_name(*c, b.addr()).unwrap(), to, "B serves {c} where A pinned it");
    }
    let peers = get_json(a.admin(), "/api/peers");
    assert_eq!((peers[0]["name"].as_str(), peers[0]["rejected"].as_u64()), (Some("b"), Some(0)));
    assert_eq!((peers[0]["lag_entries"].as_u64(), peers[0]["lag_ms"].as_u64()), (Some(0), Some(0)));
    assert!(scrape(&a, "tether_peer_sent_total", "peer=\"b\"") >= moved.len() as f64);
}

#[test]
fn a_peer_with_the_wrong_key_or_garbage_is_refused_and_changes_nothing() {
    let pool = backends(141, 2);
    let key = key_file("refuse", KEY);
    let wrong = key_file("refuse-wrong", OTHER_KEY);
    let b = tether_with_admin(
        141,
        &pool,
        &[
            "--name",
            "b",
            "--peer-listen",
            "127.0.141.2:0",
            "--peer-key-file",
            key.to_str().unwrap(),
        ],
    );
    let to_b = format!("b={}", b.peer_addr());
    let c = tether_with_admin(
        141,
        &pool,
        &["--name", "c", "--peer", &to_b, "--peer-key-file", wrong.to_str().unwrap()],
    );
    // Garbage straight to the peer port.
    let mut junk = std::net::TcpStream::connect(b.peer_addr()).unwrap();
    let _ = junk.write_all(&[0xff; 64]);
    let refused =
        wait_until(DEADLINE, || scrape(&b, "tether_peer_unknown_rejected_total", "") >= 2.0);
    assert!(refused, "B refused {}", scrape(&b, "tether_peer_unknown_rejected_total", ""));
    assert!(b.stderr_text().contains("does not hold the key"), "{}", b.stderr_text());
    // C reports its peer as failing, with the refusal counted.
    let failed = wait_until(DEADLINE, || {
        let p = &get_json(c.admin(), "/api/peers")[0];
        p["state"] == "failed" && p["rejected"].as_u64() >= Some(1)
    });
    assert!(failed, "{}", get_json(c.admin(), "/api/peers"));
    // C's pins never reach B, and both keep serving.
    let client = IpAddr::V4(Ipv4Addr::new(127, 1, 141, 10));
    ask_name(client, c.addr()).unwrap();
    ask_name(IpAddr::V4(Ipv4Addr::new(127, 1, 141, 11)), b.addr()).unwrap();
    assert_eq!(pinned_to(b.admin(), client), None);
}

// === misbehaving peers, played by the test with the protocol crate ===

/// The test's side of a handshake with tether (`dialer`: the test opened the connection).
fn handshake(stream: &mut std::net::TcpStream, dialer: bool, me: &str, key: &str) -> String {
    use peers::wire::{decode, encode, Message, PROTOCOL};
    let key = peers::auth::Key::parse(key).unwrap();
    let nonce = [dialer as u8 + 1; 32];
    let mut out = Vec::new();
    encode(&Message::Hello { protocol: PROTOCOL, name: me.into(), nonce }, &mut out);
    stream.write_all(&out).unwrap();
    let mut buf = Vec::new();
    let mut next = |stream: &mut std::net::TcpStream| loop {
        if let Some((m, used)) = decode(&buf).unwrap() {
            buf.drain(..used);
            return m;
        }
        let mut chunk = [0u8; 4096];
        let n = std::io::Read::read(stream, &mut chunk).unwrap();
        assert!(n > 0, "tether closed the connection during the handshake");
        buf.extend_from_slice(&chunk[..n]);
    };
    let Message::Hello { name, nonce: theirs, .. } = next(stream) else { panic!("no hello") };
    out.clear();
    encode(&Message::Proof(key.proof(dialer, &nonce, &theirs, me, &name)), &mut out);
    stream.write_all(&out).unwrap();
    let Message::Proof(p) = next(stream) else { panic!("no proof") };
    assert!(key.verify(&p, !dialer, &theirs, &nonce, &name, me), "tether's proof");
    name
}

#[test]
fn a_peer_that_stops_reading_is_dropped_and_nobody_waits_for_it() {
    let pool = backends(142, 2);
    let key = key_file("stall", KEY);
    let fake = std::net::TcpListener::bind("127.0.142.5:0").unwrap();
    let to_fake = format!("stuck={}", fake.local_addr().unwrap());
    let a = tether_with_admin(
        142,
        &pool,
        &["--name", "a", "--peer", &to_fake, "--peer-key-file", key.to_str().unwrap()],
    );
    // The fake peer completes the handshake, then never reads nor answers a ping again.
    let (mut held, _) = fake.accept().unwrap();
    held.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(handshake(&mut held, false, "stuck", KEY), "a");
    let state = || get_json(a.admin(), "/api/peers")[0]["state"].as_str().unwrap().to_string();
    assert!(wait_until(DEADLINE, || state() == "connected"));
    let at = Instant::now();
    let mut served = 0;
    let dropped = wait_until(DEADLINE, || {
        // Clients are served all along, and each new pin goes to the stuck peer's queue.
        let ip = IpAddr::V4(Ipv4Addr::new(127, 1, 142, 10 + (served % 200) as u8));
        ask_name(ip, a.addr()).expect("served while a peer is stuck");
        served += 1;
        state() != "connected"
    });
    assert!(dropped, "the stuck peer is still 'connected' after {:?}", at.elapsed());
    eprintln!(
        "a peer that stopped answering was dropped after {:?}; {served} clients served meanwhile",
        at.elapsed()
    );
    assert!(a.stderr_text().contains("peer stuck: no answer"), "{}", a.stderr_text());
    // It is dialled again.
    let (mut again, _) = fake.accept().unwrap();
    again.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(handshake(&mut again, false, "stuck", KEY), "a");
}

#[test]
fn a_flood_of_updates_from_a_peer_is_bounded_by_the_sticky_capacity() {
    use peers::wire::{encode, Change, Message, What};
    let pool = backends(143, 2);
    let key = key_file("flood", KEY);
    let b = tether_with_admin(
        143,
        &pool,
        &[
            "--name",
            "b",
            "--peer-listen",
            "127.0.143.2:0",
            "--peer-key-file",
            key.to_str().unwrap(),
            "--sticky-capacity",
            "10000",
        ],
    );
    let rss_before = b.rss_kib().unwrap();
    let ticks_before = b.cpu_ticks().unwrap();
    let mut s = std::net::TcpStream::connect(b.peer_addr()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(handshake(&mut s, true, "flood", KEY), "b");
    let total: u32 = 200_000;
    let (mut out, mut bytes) = (Vec::new(), 0usize);
    let start = Instant::now();
    for chunk in 0..total / 64 {
        let changes: Vec<Change> = (0..64u32)
            .map(|i| {
                let n = chunk * 64 + i;
                let mut key = [0u8; 16];
                key[12..].copy_from_slice(&n.to_be_bytes());
                Change {
                    service: "default".into(),
                    key,
                    what: What::Pin { backend: "b1".into(), left_ms: Some(600_000) },
                    version: peers::Version { unix_ms: 1, origin: "flood".into() },
                }
            })
            .collect();
        out.clear();
        encode(&Message::Changes(changes), &mut out);
        bytes += out.len();
        s.write_all(&out).unwrap();
    }
    // A ping answered means everything before it was applied.
    out.clear();
    encode(&Message::Ping, &mut out);
    s.write_all(&out).unwrap();
    let mut answer = [0u8; 5];
    std::io::Read::read_exact(&mut s, &mut answer).expect("the ping's answer");
    let took = start.elapsed();
    let cpu = (b.cpu_ticks().unwrap() - ticks_before) as f64 / 100.0;
    let entries = scrape(&b, "tether_sticky_entries", "");
    let grew = b.rss_kib().unwrap().saturating_sub(rss_before);
    eprintln!(
        "{total} pin changes, {} bytes each on the wire, applied in {took:?} ({:.0}/s), {cpu:.2} s of CPU ({:.2} µs each); {entries} entries kept, RSS +{grew} KiB",
        bytes / total as usize,
        f64::from(total) / took.as_secs_f64(),
        cpu * 1e6 / f64::from(total),
    );
    assert!(entries <= 10_000.0, "{entries} entries past the capacity");
    assert!(grew < 64 * 1024, "RSS grew {grew} KiB");
    // B still serves, and counts what it took from an unlisted peer nowhere but its table.
    ask_name(IpAddr::V4(Ipv4Addr::new(127, 1, 143, 10)), b.addr()).unwrap();
}

#[test]
fn a_pin_with_sessions_open_on_one_instance_does_not_expire_on_its_peer() {
    let pool = backends(144, 2);
    let key = key_file("touch", KEY);
    let key = key.to_str().unwrap();
    let timeout = ["--sticky-timeout", "2s"];
    let mut b_args = vec!["--name", "b", "--peer-listen", "127.0.144.2:0", "--peer-key-file", key];
    b_args.extend(timeout);
    let b = tether_with_admin(144, &pool, &b_args);
    let to_b = format!("b={}", b.peer_addr());
    let mut a_args = vec!["--name", "a", "--peer", &to_b, "--peer-key-file", key];
    a_args.extend(timeout);
    let a = tether_with_admin(144, &pool, &a_args);
    assert!(wait_until(DEADLINE, || get_json(a.admin(), "/api/peers")[0]["state"] == "connected"));
    let client = IpAddr::V4(Ipv4Addr::new(127, 1, 144, 10));
    let (session, backend) = hold(client, a.addr()).unwrap();
    assert!(wait_until(DEADLINE, || pinned_to(b.admin(), client).as_deref() == Some(&backend)));
    // Two and a half sticky timeouts while the session stays open on A: A sends the pin again
    // every second, and B's copy never lapses.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            pinned_to(b.admin(), client).as_deref(),
            Some(backend.as_str()),
            "lapsed at {:?}",
            watch.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200)); // the observation's pace
    }
    // Closed: no more touches, and B's copy expires on its own.
    drop(session);
    assert!(wait_until(DEADLINE, || pinned_to(b.admin(), client).is_none()), "B kept the pin");
}

#[test]
fn a_pin_that_expires_where_it_was_made_expires_on_its_peer() {
    let pool = backends(145, 2);
    let key = key_file("expire", KEY);
    let key = key.to_str().unwrap();
    // B would keep what it learns for a minute; A's pins expire 2 s after their last session.
    let b = tether_with_admin(
        145,
        &pool,
        &[
            "--name",
            "b",
            "--peer-listen",
            "127.0.145.2:0",
            "--peer-key-file",
            key,
            "--sticky-timeout",
            "60s",
        ],
    );
    let to_b = format!("b={}", b.peer_addr());
    let a = tether_with_admin(
        145,
        &pool,
        &["--name", "a", "--peer", &to_b, "--peer-key-file", key, "--sticky-timeout", "2s"],
    );
    assert!(wait_until(DEADLINE, || get_json(a.admin(), "/api/peers")[0]["state"] == "connected"));
    let client = IpAddr::V4(Ipv4Addr::new(127, 1, 145, 10));
    let backend = ask_name(client, a.addr()).unwrap();
    assert!(wait_until(DEADLINE, || pinned_to(b.admin(), client).as_deref() == Some(&backend)));
    let at = Instant::now();
    assert!(wait_until(DEADLINE, || pinned_to(a.admin(), client).is_none()), "A kept it");
    let gone = wait_until(DEADLINE, || pinned_to(b.admin(), client).is_none());
    assert!(gone, "B kept the pin A let expire");
    eprintln!(
        "B dropped the pin {:?} after A's session closed (B's own timeout: 60 s)",
        at.elapsed()
    );
    assert!(at.elapsed() < Duration::from_secs(20));
}

#[test]
fn with_peer_health_quorum_a_backend_most_instances_see_down_is_down_here_too() {
    use peers::wire::{encode, HealthView, Message};
    let pool = backends(146, 2);
    let key = key_file("quorum", KEY);
    let b = tether_with_admin(
        146,
        &pool,
        &[
            "--name",
            "b",
            "--peer-listen",
            "127.0.146.2:0",
            "--peer-key-file",
            key.to_str().unwrap(),
            "--peer-health",
            "quorum",
        ],
    );
    // Two instances played by the test: each says what its probes see of b0, then pings; the
    // ping's answer means B has read the view.
    let tell = |s: &mut std::net::TcpStream, up: bool| {
        let mut out = Vec::new();
        let view = HealthView { service: "default".into(), backend: "b0".into(), up };
        encode(&Message::Health(vec![view]), &mut out);
        encode(&Message::Ping, &mut out);
        s.write_all(&out).unwrap();
        let mut answer = [0u8; 5];
        std::io::Read::read_exact(s, &mut answer).expect("the ping's answer");
    };
    let join = |name: &str| {
        let mut s = std::net::TcpStream::connect(b.peer_addr()).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        assert_eq!(handshake(&mut s, true, name, KEY), "b");
        s
    };
    let health = || get_json(b.admin(), "/api/backends")[0]["health"].as_str().unwrap().to_string();
    assert_eq!(get_json(b.admin(), "/api/backends")[0]["name"], "b0");
    // One of two instances sees b0 down: no majority, b0 stays up here.
    let mut x = join("x");
    tell(&mut x, false);
    let settled = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < settled {
        assert_eq!(health(), "up", "one vote of two took b0 down");
        std::thread::sleep(Duration::from_millis(100)); // the observation's pace
    }
    // Two of three: down here too, though B's own probes never said so.
    let mut y = join("y");
    tell(&mut y, false);
    assert!(wait_until(DEADLINE, || health() == "down"), "b0 still {}", health());
    let events = get_json(b.admin(), "/api/events").to_string();
    assert!(events.contains("down on 2 of 3 instances"), "{events}");
    // New clients stay off b0 while it is down.
    for i in 0..20 {
        let c = IpAddr::V4(Ipv4Addr::new(127, 1, 146, 10 + i));
        assert_eq!(ask_name(c, b.addr()).unwrap(), "b1");
    }
    // The others see it up again: up here.
    tell(&mut x, true);
    tell(&mut y, true);
    assert!(wait_until(DEADLINE, || health() == "up"), "b0 still {}", health());
    // Votes go stale when their senders go quiet: y says down and disappears.
    tell(&mut x, false);
    tell(&mut y, false);
    assert!(wait_until(DEADLINE, || health() == "down"));
    drop((x, y));
    assert!(wait_until(DEADLINE, || health() == "up"), "stale votes kept b0 down");
}

#[test]
fn a_key_only_root_may_read_is_read_before_root_is_dropped() {
    use std::os::unix::fs::PermissionsExt;
    let pool = backends(147, 1);
    let key = key_file("private", KEY);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let b = tether_with_admin(
        147,
        &pool,
        &[
            "--name",
            "b",
            "--peer-listen",
            "127.0.147.2:0",
            "--peer-key-file",
            key.to_str().unwrap(),
            "--user",
            "nobody",
        ],
    );
    assert!(b.stderr_text().contains("running as user nobody"), "{}", b.stderr_text());
    let mut s = std::net::TcpStream::connect(b.peer_addr()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(handshake(&mut s, true, "x", KEY), "b", "the key it read as root");
}
