//! Affinity by prefix (issue 17): `--affinity source/24` (or `source/24,64`) pins a whole IPv4
//! /24 (IPv6 /64) as one client, so the players behind one carrier-grade NAT or the hosts of one
//! IPv6 /64 share a backend and a pin; `--limit-per prefix` counts the per-source limits the
//! same way.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use common::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn the_clients_of_one_network_share_a_backend_and_one_pin() {
    let pool = backends(164, 3);
    let t = tether_with_admin(164, &pool, &["--affinity", "source/24,64"]);
    let admin = t.admin();
    let first = ask_name(ip("127.1.164.10"), t.addr()).unwrap();
    for i in 11..40 {
        let name = ask_name(ip(&format!("127.1.164.{i}")), t.addr()).unwrap();
        assert_eq!(name, first, "127.1.164.{i} left its network's backend");
    }
    // One pin for the network: any of its addresses finds it, and it counts the sessions of
    // two different addresses.
    let (_a, _) = hold(ip("127.1.164.50"), t.addr()).unwrap();
    let (_b, _) = hold(ip("127.1.164.51"), t.addr()).unwrap();
    let mut pin = serde_json::Value::Null;
    let two = wait_until(DEADLINE, || {
        pin = get_json(admin, "/api/sticky?client=127.1.164.250");
        pin["sessions"] == 2
    });
    assert!(two, "the two held sessions on one pin: {pin}");
    assert_eq!(pin["backend"], first.as_str(), "{pin}");
    let pinned: u64 =
        api_backends(admin).iter().map(|b| b["sticky_clients"].as_u64().unwrap()).sum();
    assert_eq!(pinned, 1, "40 addresses of one /24 are one pinned client");

    // Networks still spread: 30 other /24s do not all land on one backend (all on one of
    // three would happen about once in 10^14 seeds).
    let names: BTreeSet<String> =
        (0..30).map(|n| ask_name(ip(&format!("127.1.{}.7", 100 + n)), t.addr()).unwrap()).collect();
    assert!(names.len() > 1, "{names:?}");
    let pinned: u64 =
        api_backends(admin).iter().map(|b| b["sticky_clients"].as_u64().unwrap()).sum();
    assert_eq!(pinned, 31);
}

#[test]
fn a_v4_mapped_client_shares_the_pin_of_its_ipv4_network() {
    let pool = backends(165, 3);
    let args = vec![
        "--listen".to_string(),
        "[::]:0".into(),
        "--admin".into(),
        "127.0.165.1:0".into(),
        "--affinity".into(),
        "source/24".into(),
    ];
    let mut all = args;
    all.extend(backend_args(&pool));
    let t = Tether::start(bin(), no_probes(&all)).unwrap();
    // Through the [::] listener's IPv4 side tether sees ::ffff:127.1.165.x.
    let v4 = SocketAddr::from(([127, 0, 165, 1], t.addr().port()));
    let (_held, name) = hold(ip("127.1.165.10"), v4).unwrap();
    let pin = get_json(t.admin(), "/api/sticky?client=127.1.165.99");
    assert_eq!(pin["backend"], name.as_str(), "the v4 query finds the mapped client's pin: {pin}");
    let pin = get_json(t.admin(), "/api/sticky?client=%3A%3Affff%3A127.1.165.200");
    assert_eq!(pin["backend"], name.as_str(), "{pin}");
    for i in 20..30 {
        assert_eq!(ask_name(ip(&format!("127.1.165.{i}")), v4).unwrap(), name);
    }
}

#[test]
fn limit_per_prefix_counts_a_whole_network_against_the_per_source_limit() {
    let pool = backends(166, 1);
    let t = tether(
        166,
        &pool,
        &["--affinity", "source/24", "--max-conns-per-source", "2", "--limit-per", "prefix"],
    );
    let (a, _) = hold(ip("127.1.166.10"), t.addr()).unwrap();
    let (_b, _) = hold(ip("127.1.166.11"), t.addr()).unwrap();
    assert!(refused(ip("127.1.166.12"), t.addr()), "a third session of the /24 got through");
    // Another network has its own budget; one session of the first ending frees a place.
    assert_eq!(ask_name(ip("127.1.167.12"), t.addr()).unwrap(), "b0");
    drop(a);
    assert!(wait_until(DEADLINE, || !refused(ip("127.1.166.12"), t.addr())));

    // Counted per address (the default), the same three addresses are all served.
    let pool = backends(168, 1);
    let t = tether(168, &pool, &["--affinity", "source/24", "--max-conns-per-source", "2"]);
    let held: Vec<_> =
        (10..13).map(|i| hold(ip(&format!("127.1.168.{i}")), t.addr()).unwrap()).collect();
    assert_eq!(held.len(), 3);
}
