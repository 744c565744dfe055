//! UDP sessions keyed by what the client sends (issue 17, part 4): `--udp-session-key` keeps a
//! client's flow (same backend, same backend-side socket) when its port or address changes,
//! only after `--udp-migrate-after` datagrams from the new address; a spoofed datagram moves
//! nothing; a datagram too short for the key goes by address; the pin is the key's; a keyed
//! flow survives an upgrade. Four workers, so a flow found after a move proves the steering
//! program kept the key on its worker (without it, three moves in four land elsewhere).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

/// Game servers: plain sockets the test reads and answers itself, so it sees each datagram's
/// peer (tether's backend-side socket) and order.
struct Servers(Vec<UdpSocket>);

impl Servers {
    fn start(net: u8, n: usize) -> Servers {
        Servers(
            (0..n)
                .map(|i| {
                    let s = UdpSocket::bind((Ipv4Addr::new(127, 0, net, 10 + i as u8), 0)).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                    s
                })
                .collect(),
        )
    }

    fn args(&self) -> Vec<String> {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                ["--backend".to_string(), format!("{},name=g{i}", s.local_addr().unwrap())]
            })
            .collect()
    }

    /// The next datagram any server gets: (server, peer, payload).
    fn next(&self) -> (usize, SocketAddr, Vec<u8>) {
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            for (i, s) in self.0.iter().enumerate() {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    return (i, from, buf[..n].to_vec());
                }
            }
        }
        panic!("no server got a datagram within {DEADLINE:?}");
    }
}

/// A datagram of session `token` numbered `seq`: the key is bytes 1..9.
fn datagram(token: &[u8; 8], seq: u32) -> Vec<u8> {
    let mut d = vec![b'G'];
    d.extend_from_slice(token);
    d.extend_from_slice(format!(" seq={seq}").as_bytes());
    d
}

fn seq_of(payload: &[u8]) -> u32 {
    let text = std::str::from_utf8(&payload[9..]).unwrap();
    text.trim().strip_prefix("seq=").unwrap().parse().unwrap()
}

fn socket(ip: IpAddr) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// tether on 127.0.`net`.1 (listener and admin) with four workers and `--udp-session-key 1:8`.
fn tether_keyed(net: u8, servers: &Servers, extra: &[&str]) -> Tether {
    tether_keyed_on(&format!("127.0.{net}.1:0"), net, servers, extra)
}

/// [`tether_keyed`] listening on `listen`.
fn tether_keyed_on(listen: &str, net: u8, servers: &Servers, extra: &[&str]) -> Tether {
    let mut args = vec![
        "--listen".to_string(),
        listen.to_string(),
        "--admin".into(),
        format!("127.0.{net}.1:0"),
        "--protocol".into(),
        "udp".into(),
        "--workers".into(),
        "4".into(),
        "--udp-session-key".into(),
        "1:8".into(),
    ];
    args.extend(servers.args());
    args.extend(extra.iter().map(|s| s.to_string()));
    Tether::start(bin(), no_probes(&args)).expect("start tether")
}

/// Send `seq` from `from` to `t`'s listener: the server and peer it reached (it must be the
/// next datagram any server gets), once the server's reply reached `from`, from the listener.
fn round_trip(
    t: &Tether,
    servers: &Servers,
    from: &UdpSocket,
    token: &[u8; 8],
    seq: u32,
) -> (usize, SocketAddr) {
    round_trip_to(t.udp_addr(), servers, from, token, seq)
}

/// [`round_trip`] to address `to` of a listener (one of a wildcard listener's).
fn round_trip_to(
    to: SocketAddr,
    servers: &Servers,
    from: &UdpSocket,
    token: &[u8; 8],
    seq: u32,
) -> (usize, SocketAddr) {
    from.send_to(&datagram(token, seq), to).unwrap();
    let (server, peer, payload) = servers.next();
    assert_eq!(seq_of(&payload), seq, "datagram {seq} of {token:?}: another came first");
    servers.0[server].send_to(format!("ack {seq}").as_bytes(), peer).unwrap();
    let mut buf = [0u8; 64];
    let (n, at) = from.recv_from(&mut buf).expect("the reply reaches the client's newest address");
    assert_eq!((&buf[..n], at), (format!("ack {seq}").as_bytes(), to), "the reply's source");
    (server, peer)
}

#[test]
fn a_client_that_changes_port_then_address_keeps_its_flow_and_loses_only_the_unproven_datagrams() {
    let servers = Servers::start(176, 2);
    let t = tether_keyed(176, &servers, &[]);
    let clients = 8u8;
    for c in 0..clients {
        let token: [u8; 8] = *format!("tok{c:05}").as_bytes().first_chunk().unwrap();
        let home = socket(IpAddr::V4(Ipv4Addr::new(127, 1, 176, c + 1)));
        let first = round_trip(&t, &servers, &home, &token, 0);
        for seq in 1..3 {
            assert_eq!(round_trip(&t, &servers, &home, &token, seq), first);
        }
        // A new port (NAT rebinding): its first datagram is held back (dropped), the second
        // moves the flow; the backend sees the same peer on the same server throughout.
        let rebound = socket(IpAddr::V4(Ipv4Addr::new(127, 1, 176, c + 1)));
        rebound.send_to(&datagram(&token, 3), t.udp_addr()).unwrap();
        assert_eq!(round_trip(&t, &servers, &rebound, &token, 4), first, "after a new port");
        assert_eq!(round_trip(&t, &servers, &rebound, &token, 5), first);
        // A new address (Wi-Fi to LTE): the same.
        let roamed = socket(IpAddr::V4(Ipv4Addr::new(127, 1, 177, c + 1)));
        roamed.send_to(&datagram(&token, 6), t.udp_addr()).unwrap();
        assert_eq!(round_trip(&t, &servers, &roamed, &token, 7), first, "after a new address");
    }
    let moved = f64::from(clients) * 2.0;
    assert_eq!(scrape(&t, "tether_udp_flow_migrations_total", ""), moved);
    let pending = scrape(&t, "tether_datagrams_dropped_total", "reason=\"migration_pending\"");
    assert_eq!(pending, moved, "only the datagram before each accepted move is lost");
    // Each move is logged, with where from and where to.
    let roamed = "127.1.177.1:";
    assert!(t.wait_stderr(|l| l.contains("keyed flow to g") && l.contains(roamed), DEADLINE));
    let flows = get_json(t.admin(), "/api/flows");
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len(), usize::from(clients), "{flows:?}");
    assert!(flows.iter().all(|f| f["keyed"] == true && f["migrations"] == 2), "{flows:?}");
}

#[test]
fn a_spoofed_datagram_with_another_clients_key_moves_nothing() {
    let servers = Servers::start(177, 2);
    let t = tether_keyed(177, &servers, &["--udp-migrate-after", "3"]);
    let token = *b"victim!!";
    let victim = socket("127.1.178.1".parse().unwrap());
    let attacker = socket("127.1.178.2".parse().unwrap());
    let first = round_trip(&t, &servers, &victim, &token, 0);
    // One spoofed datagram, then two: fewer than 3, and the victim speaks between them.
    attacker.send_to(&datagram(&token, 100), t.udp_addr()).unwrap();
    assert_eq!(round_trip(&t, &servers, &victim, &token, 1), first);
    attacker.send_to(&datagram(&token, 101), t.udp_addr()).unwrap();
    attacker.send_to(&datagram(&token, 102), t.udp_addr()).unwrap();
    assert_eq!(round_trip(&t, &servers, &victim, &token, 2), first);
    attacker.send_to(&datagram(&token, 103), t.udp_addr()).unwrap();
    assert_eq!(round_trip(&t, &servers, &victim, &token, 3), first);
    assert_eq!(scrape(&t, "tether_udp_flow_migrations_total", ""), 0.0);
    // Every reply went to the victim: nothing is waiting for the attacker.
    attacker.set_nonblocking(true).unwrap();
    assert!(attacker.recv_from(&mut [0u8; 64]).is_err(), "the attacker got a reply");
    let pending = scrape(&t, "tether_datagrams_dropped_total", "reason=\"migration_pending\"");
    assert_eq!(pending, 4.0);
}

#[test]
fn a_short_datagram_goes_by_address_and_the_pin_is_the_keys() {
    let servers = Servers::start(178, 4);
    let t = tether_keyed(178, &servers, &["--udp-idle-timeout", "1s"]);
    let token = *b"pinned-1";
    let home = socket("127.1.179.1".parse().unwrap());
    let (server, peer) = round_trip(&t, &servers, &home, &token, 0);
    // Four bytes cannot hold the key (1..9): a flow of the address, its own backend socket.
    home.send_to(b"Gxyz", t.udp_addr()).unwrap();
    let (_, short_peer, payload) = servers.next();
    assert_eq!(payload, b"Gxyz");
    assert_ne!(short_peer, peer, "a short datagram went into the keyed flow");
    assert_eq!(scrape(&t, "tether_udp_session_key_short_total", ""), 1.0);
    // The pin is the key's (found by the key's bytes in hex); the keyed flow made none for
    // the client's address (its short datagram's flow did, to wherever its address hashes).
    let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
    let pin = get_json(t.admin(), &format!("/api/sticky?session={hex}"));
    assert_eq!(pin["backend"], format!("g{server}"), "{pin}");
    assert_eq!(pin["sessions"], 1, "{pin}");
    for bad in ["session=abc", "session=zz", "session=+f", "client=127.0.0.1&session=00", ""] {
        let r = http(t.admin(), "GET", &format!("/api/sticky?{bad}"), "").unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    // The same from the shell: `tether ctl sticky --session HEX`; a client and a key at once,
    // or neither, is a bad command line (exit 2).
    let ctl = |args: &[&str]| {
        let admin = t.admin().to_string();
        let all = [&["ctl", "--admin", admin.as_str(), "sticky"], args].concat();
        std::process::Command::new(bin()).args(all).output().unwrap()
    };
    let out = ctl(&["--session", &hex]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with(&format!("session key {hex} is pinned to default/g{server}: 1 ")),
        "{said}"
    );
    assert_eq!(ctl(&["127.0.0.1", "--session", &hex]).status.code(), Some(2));
    assert_eq!(ctl(&[]).status.code(), Some(2));
    // Both flows expire; the key from a new address (no flow to move: a new one) is pinned
    // to the same server, by the key.
    assert!(wait_until(DEADLINE, || get_json(t.admin(), "/api/flows")
        .as_array()
        .is_some_and(|f| f.is_empty())));
    for i in 0..5u8 {
        let elsewhere = socket(IpAddr::V4(Ipv4Addr::new(127, 1, 180, i + 1)));
        assert_eq!(round_trip(&t, &servers, &elsewhere, &token, 10 + u32::from(i)).0, server);
        assert!(wait_until(DEADLINE, || get_json(t.admin(), "/api/flows")
            .as_array()
            .is_some_and(|f| f.is_empty())));
    }
}

#[test]
fn a_keyed_flow_and_its_moves_carry_on_across_an_upgrade() {
    let servers = Servers::start(179, 2);
    let t = tether_keyed(179, &servers, &["--upgrade-grace", "1s"]);
    let token = *b"upgrade!";
    let home = socket("127.1.181.1".parse().unwrap());
    let first = round_trip(&t, &servers, &home, &token, 0);
    let old = t.pid();
    let r = http(t.admin(), "POST", "/api/upgrade", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let mut new = None;
    assert!(wait_until(DEADLINE, || {
        new = get_json(t.admin(), "/api/status")["pid"].as_u64().filter(|&p| p != u64::from(old));
        new.is_some()
    }));
    let _successor = Successor(new.map(|p| p as u32));
    // The new process carries the flow on: same socket toward the server, and a move works.
    assert_eq!(round_trip(&t, &servers, &home, &token, 1), first);
    let roamed = socket("127.1.181.2".parse().unwrap());
    roamed.send_to(&datagram(&token, 2), t.udp_addr()).unwrap();
    assert_eq!(round_trip(&t, &servers, &roamed, &token, 3), first);
}

#[test]
fn a_reload_sets_the_key_on_running_listeners_and_takes_it_away() {
    let servers = Servers::start(183, 2);
    let base = {
        let mut s = "admin = \"127.0.183.1:0\"\nworkers = 4\nudp-offload = \"on\"\n[[service]]\nname = \"game\"\n\
            listen = [\"127.0.183.1:0\"]\nprotocol = \"udp\"\nhealth-check = \"off\"\n"
            .to_string();
        for (i, b) in servers.0.iter().enumerate() {
            let at = b.local_addr().unwrap();
            s.push_str(&format!("[[service.backend]]\naddress = \"{at}\"\nname = \"g{i}\"\n"));
        }
        s
    };
    let file = ConfigFile::new("key-reload", &base);
    let t = Tether::start(bin(), ["--config", file.path()]).unwrap();
    // Before the key: a flow of the address, offloaded (the kernel carries its 4-tuple).
    let token = *b"reloaded";
    let ip: IpAddr = "127.1.183.1".parse().unwrap();
    let home = socket(ip);
    let (_, by_address) = round_trip(&t, &servers, &home, &token, 0);
    assert!(wait_until(DEADLINE, || get_json(t.admin(), "/api/flows")[0]["offloaded"] == true));
    let reload = |text: &str| {
        file.write(text);
        let r = http(t.admin(), "POST", "/api/reload", "").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    };
    let keyed =
        base.replace("protocol = \"udp\"\n", "protocol = \"udp\"\nudp-session-key = \"1:8\"\n");
    reload(&keyed);
    // The offloaded flow came back to user space: the same 4-tuple's keyed datagrams make a
    // keyed flow (its own backend socket) instead of riding the old one in the kernel.
    let first = round_trip(&t, &servers, &home, &token, 1);
    assert_ne!(first.1, by_address, "a keyed datagram took the offloaded address flow");
    // The key now holds on the listeners bound before it: a client moves through three ports
    // (with four workers, the kernel's hash alone would lose it on one of them).
    for k in 0..3 {
        let next = socket(ip);
        next.send_to(&datagram(&token, 10 * k + 1), t.udp_addr()).unwrap();
        assert_eq!(round_trip(&t, &servers, &next, &token, 10 * k + 2), first, "move {k}");
    }
    // Taken away: a new port is a new client again (its own flow and backend socket).
    reload(&base);
    let stranger = socket(ip);
    let (_, peer) = round_trip(&t, &servers, &stranger, &token, 100);
    assert_ne!(peer, first.1, "without the key, a new port still found the keyed flow");
    assert!(!t.stderr_text().contains("steering datagrams"), "{}", t.stderr_text());
}

/// The source a PROXY v2 header in front of `payload` names, and what follows it (`None`:
/// no header).
fn header_source(payload: &[u8]) -> (Option<SocketAddr>, Vec<u8>) {
    match proxyproto::parse_datagram(payload) {
        Ok((proxyproto::Header::Proxy { source, .. }, rest)) => (Some(source), rest.to_vec()),
        _ => (None, payload.to_vec()),
    }
}

#[test]
fn with_send_proxy_the_backend_learns_each_move_from_a_new_header() {
    let servers = Servers::start(184, 1);
    let t = tether_keyed(184, &servers, &["--send-proxy", "v2"]);
    let token = *b"proxied!";
    let home = socket("127.1.184.1".parse().unwrap());
    let roamed = socket("127.1.184.2".parse().unwrap());
    let expect = |from: &UdpSocket, seq: u32, header: Option<SocketAddr>| {
        from.send_to(&datagram(&token, seq), t.udp_addr()).unwrap();
        let (_, peer, payload) = servers.next();
        let (source, rest) = header_source(&payload);
        assert_eq!(source, header, "datagram {seq}");
        assert_eq!(seq_of(&rest), seq);
        peer
    };
    let here = Some(home.local_addr().unwrap());
    let peer = expect(&home, 0, here);
    assert_eq!(expect(&home, 1, None), peer, "a header on a later datagram");
    roamed.send_to(&datagram(&token, 2), t.udp_addr()).unwrap(); // held back: the first
    assert_eq!(expect(&roamed, 3, Some(roamed.local_addr().unwrap())), peer);
    assert_eq!(expect(&roamed, 4, None), peer);
}

#[test]
fn a_client_moving_from_ipv4_to_ipv6_keeps_its_flow_on_a_dual_stack_listener() {
    let servers = Servers::start(185, 2);
    let t = tether_keyed_on("[::]:0", 185, &servers, &[]);
    let port = t.udp_addr().port();
    let token = *b"dual-stk";
    let (v4, v6): (SocketAddr, SocketAddr) = (
        SocketAddr::new("127.0.185.1".parse().unwrap(), port),
        SocketAddr::new("::1".parse().unwrap(), port),
    );
    let home = socket("127.1.185.1".parse().unwrap());
    let first = round_trip_to(v4, &servers, &home, &token, 0);
    let moved = socket("::1".parse().unwrap());
    moved.send_to(&datagram(&token, 1), v6).unwrap();
    let again = round_trip_to(v6, &servers, &moved, &token, 2);
    assert_eq!(again, first, "the IPv6 address got a flow of its own");
}

#[test]
fn with_the_offload_on_a_short_datagrams_flow_does_not_take_the_addresss_keyed_datagrams() {
    let servers = Servers::start(186, 2);
    let t = tether_keyed(186, &servers, &["--udp-offload", "on"]);
    let token = *b"offload!";
    let home = socket("127.1.186.1".parse().unwrap());
    let (_, keyed_peer) = round_trip(&t, &servers, &home, &token, 0);
    // A short datagram from the same socket: an address flow of its own (its own peer), and
    // its reply, so that an offloaded flow would now carry this 4-tuple in the kernel.
    home.send_to(b"Gxy", t.udp_addr()).unwrap();
    let (server, short_peer, _) = servers.next();
    assert_ne!(short_peer, keyed_peer);
    servers.0[server].send_to(b"short", short_peer).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(home.recv(&mut buf).unwrap(), 5);
    // The address's keyed datagrams still reach the keyed flow.
    for seq in 1..4 {
        assert_eq!(round_trip(&t, &servers, &home, &token, seq).1, keyed_peer);
    }
    let flows = get_json(t.admin(), "/api/flows");
    assert!(flows.as_array().unwrap().iter().all(|f| f["offloaded"] == false), "{flows}");
}
