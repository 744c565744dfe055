//! Access rules and per-source limits (issue 6): denied sources never reach a backend (TCP and
//! UDP, v4, v6 and mapped); each limit holds exactly at its threshold and recovers.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn denied_tcp_sources_never_reach_a_backend() {
    let pool = backends(84, 2);
    // client_ip(0..254) are 127.1.0.x, client_ip(254..508) are 127.1.1.x.
    let t = tether_with_admin(84, &pool, &["--deny", "127.1.0.0/24"]);
    for i in [0, 5, 100, 253] {
        assert!(refused(client_ip(i), t.addr()), "{} got through", client_ip(i));
    }
    for i in [254, 300, 507] {
        ask_name(client_ip(i), t.addr()).unwrap_or_else(|e| panic!("{}: {e}", client_ip(i)));
    }
    // Backends see tether's address, not the client's: count their sessions instead.
    let sessions: usize = pool.iter().map(|b| b.log().len()).sum();
    assert_eq!(sessions, 3, "denied clients reached a backend");
    let metrics = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    assert!(metrics.contains("tether_sessions_refused_total{reason=\"denied\"} 4"), "{metrics}");
}

#[test]
fn an_allow_list_admits_only_its_networks_and_deny_wins() {
    let pool = backends(85, 1);
    let t = tether(85, &pool, &["--allow", "127.1.1.0/24", "--deny", "127.1.1.128/25"]);
    assert!(refused(client_ip(0), t.addr()), "outside the allow list");
    assert_eq!(ask_name(client_ip(254), t.addr()).unwrap(), "b0"); // 127.1.1.1
    assert!(refused(client_ip(254 + 200), t.addr()), "127.1.1.201 is denied"); // deny wins
}

#[test]
fn a_v4_rule_holds_on_a_dual_stack_listener_and_v6_rules_hold_for_v6() {
    let pool = backends(86, 1);
    let v4 = client_ip(0);
    let args = [
        "--listen".to_string(),
        "[::]:0".into(),
        "--deny".into(),
        format!("{v4}/32"),
        "--deny".into(),
        "::1/128".into(),
    ];
    let mut all = args.to_vec();
    all.extend(backend_args(&pool));
    let t = Tether::start(bin(), no_probes(&all)).unwrap();
    let port = t.addr().port();
    // The v4 client arrives as ::ffff:127.1.0.1 on the [::] socket: still denied.
    assert!(refused(v4, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)));
    assert_eq!(
        ask_name(client_ip(1), SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)).unwrap(),
        "b0"
    );
    // A v6 client from ::1 is denied by the v6 rule.
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        assert!(refused(v6, SocketAddr::new(v6, port)));
    }
    assert_eq!(pool[0].log().len(), 1);
}

#[test]
fn denied_udp_sources_never_reach_a_backend() {
    let udp = UdpBackend::start("u0", "127.0.87.10:0".parse().unwrap()).unwrap();
    let mut args = vec!["--listen".to_string(), "127.0.87.1:0".into(), "--protocol".into()];
    args.extend(["udp".into(), "--deny".into(), "127.1.0.0/24".into(), "--backend".into()]);
    args.push(format!("{},name=u0", udp.addr()));
    args.extend(["--admin".into(), "127.0.87.1:0".into()]);
    let t = Tether::start(bin(), no_probes(&args)).unwrap();
    let denied = udp_client(client_ip(3)).unwrap();
    for _ in 0..5 {
        denied.send_to(b"name", t.udp_addr()).unwrap();
    }
    let allowed = udp_client(client_ip(300)).unwrap();
    let (reply, _) = udp_ask(&allowed, t.udp_addr(), b"name", DEADLINE).unwrap();
    assert_eq!(reply, b"u0");
    // The denied datagrams were read (they came first) and dropped, with their reason.
    assert!(wait_until(DEADLINE, || {
        let m = http(t.admin(), "GET", "/metrics", "").unwrap().body;
        m.contains("tether_datagrams_dropped_total{reason=\"denied\"} 5")
    }));
    assert_eq!(udp.sources().len(), 1, "a denied client's datagram reached the backend");
    let mut buf = [0u8; 64];
    denied.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    assert!(denied.recv_from(&mut buf).is_err(), "a denied client got an answer");
}

#[test]
fn max_conns_per_source_holds_at_its_threshold_and_recovers() {
    let pool = backends(88, 1);
    let t = tether(88, &pool, &["--max-conns-per-source", "2"]);
    let me = client_ip(0);
    let first = hold(me, t.addr()).unwrap();
    let second = hold(me, t.addr()).unwrap();
    assert!(refused(me, t.addr()), "a third session from one source");
    ask_name(client_ip(1), t.addr()).expect("another source is not limited");
    drop(first);
    assert!(
        wait_until(DEADLINE, || ask_name(me, t.addr()).is_ok()),
        "the source never got its place back"
    );
    drop(second);
}

#[test]
fn the_connection_rate_per_source_holds_at_its_threshold_and_recovers() {
    let pool = backends(89, 1);
    let t = tether(89, &pool, &["--max-conn-rate-per-source", "5"]);
    let me = client_ip(0);
    let start = Instant::now();
    for i in 0..5 {
        ask_name(me, t.addr()).unwrap_or_else(|e| panic!("connection {i} of the burst: {e}"));
    }
    // On a loaded machine the burst may take long enough to earn tokens back: only check the
    // refusal when it surely cannot have.
    if start.elapsed() < Duration::from_millis(150) {
        assert!(refused(me, t.addr()), "a sixth connection within the second");
    }
    ask_name(client_ip(1), t.addr()).expect("another source is not limited");
    // One token comes back every 200 ms.
    assert!(wait_until(DEADLINE, || ask_name(me, t.addr()).is_ok()));
}

#[test]
fn the_flow_rate_per_source_holds_at_its_threshold_and_recovers() {
    let udp = UdpBackend::start("u0", "127.0.90.10:0".parse().unwrap()).unwrap();
    let mut args = vec!["--listen".to_string(), "127.0.90.1:0".into(), "--protocol".into()];
    args.extend(["udp".into(), "--max-flow-rate-per-source".into(), "3".into()]);
    args.extend(["--backend".into(), format!("{},name=u0", udp.addr())]);
    let t = Tether::start(bin(), no_probes(&args)).unwrap();
    // Four flows from one IP (four ports): three are made, the fourth's datagram is dropped.
    let sockets: Vec<UdpSocket> = (0..4).map(|_| udp_client(client_ip(0)).unwrap()).collect();
    let start = Instant::now();
    for s in &sockets[..3] {
        assert_eq!(udp_ask(s, t.udp_addr(), b"name", DEADLINE).unwrap().0, b"u0");
    }
    if start.elapsed() < Duration::from_millis(250) {
        let r = udp_ask(&sockets[3], t.udp_addr(), b"name", Duration::from_millis(200));
        assert!(r.is_err(), "a fourth flow within the second");
    }
    // Established flows are not limited, and the fourth gets through once a token is back.
    assert_eq!(udp_ask(&sockets[0], t.udp_addr(), b"again", DEADLINE).unwrap().0, b"again");
    assert!(wait_until(DEADLINE, || {
        udp_ask(&sockets[3], t.udp_addr(), b"name", Duration::from_millis(300)).is_ok()
    }));
}

#[test]
fn a_full_source_table_refuses_new_sources_and_keeps_limiting_known_ones() {
    let pool = backends(91, 1);
    let t =
        tether_with_admin(91, &pool, &["--max-conns-per-source", "1", "--tracked-sources", "4"]);
    // Four sources, each with its one session open: the table is full of busy sources.
    let held: Vec<_> = (0..4).map(|i| hold(client_ip(i), t.addr()).unwrap()).collect();
    assert!(refused(client_ip(10), t.addr()), "a fifth source while the table is full");
    assert!(refused(client_ip(0), t.addr()), "a known source past its limit");
    let metrics = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    assert!(metrics.contains("tether_sessions_refused_total{reason=\"source_table_full\"} 1"));
    assert!(metrics.contains("tether_sessions_refused_total{reason=\"source_conns\"} 1"));
    // A source goes idle: its record can make room, and the new source is admitted.
    drop(held);
    assert!(wait_until(DEADLINE, || ask_name(client_ip(10), t.addr()).is_ok()));
}

#[test]
fn denied_udp_sources_stay_out_through_a_dual_stack_socket_and_over_ipv6() {
    let udp = UdpBackend::start("u0", "127.0.98.10:0".parse().unwrap()).unwrap();
    let v4 = client_ip(0);
    let mut args = vec!["--listen".to_string(), "[::]:0".into(), "--protocol".into()];
    args.extend(["udp".into(), "--deny".into(), format!("{v4}/32"), "--deny".into()]);
    args.extend(["::1/128".into(), "--backend".into(), format!("{},name=u0", udp.addr())]);
    let t = Tether::start(bin(), no_probes(&args)).unwrap();
    let port = t.udp_addr().port();
    let to_v4 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    // The denied v4 client reaches the [::] socket as ::ffff:127.1.0.1: still denied.
    let denied = udp_client(v4).unwrap();
    assert!(udp_ask(&denied, to_v4, b"name", Duration::from_millis(300)).is_err());
    let allowed = udp_client(client_ip(1)).unwrap();
    assert_eq!(udp_ask(&allowed, to_v4, b"name", DEADLINE).unwrap().0, b"u0");
    if let Ok(v6) = UdpSocket::bind("[::1]:0") {
        let to_v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port);
        assert!(udp_ask(&v6, to_v6, b"name", Duration::from_millis(300)).is_err());
    }
    assert_eq!(udp.sources().len(), 1, "a denied client's datagram reached the backend");
}
