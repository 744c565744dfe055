//! Peers (issue 14), on loopback: a pin made on one instance reaches another within a second,
//! and a peer with the wrong key or one that sends garbage is refused, reported, and changes
//! nothing. (The cluster behind real ECMP, in namespaces, is scripts/cluster.sh's.)

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

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

fn get(admin: SocketAddr, path: &str) -> Value {
    let reply = http(admin, "GET", path, "").unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

fn pinned_to(admin: SocketAddr, client: IpAddr) -> Option<String> {
    get(admin, &format!("/api/sticky?client={client}"))["backend"].as_str().map(String::from)
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
        wait_until(DEADLINE, || get(a.admin(), "/api/peers")[0]["state"] == "connected");
    assert!(connected, "{}", get(a.admin(), "/api/peers"));
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
    let peers = get(a.admin(), "/api/peers");
    assert_eq!((peers[0]["name"].as_str(), peers[0]["rejected"].as_u64()), (Some("b"), Some(0)));
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
        let p = &get(c.admin(), "/api/peers")[0];
        p["state"] == "failed" && p["rejected"].as_u64() >= Some(1)
    });
    assert!(failed, "{}", get(c.admin(), "/api/peers"));
    // C's pins never reach B, and both keep serving.
    let client = IpAddr::V4(Ipv4Addr::new(127, 1, 141, 10));
    ask_name(client, c.addr()).unwrap();
    ask_name(IpAddr::V4(Ipv4Addr::new(127, 1, 141, 11)), b.addr()).unwrap();
    assert_eq!(pinned_to(b.admin(), client), None);
}
