//! F13: ephemeral port exhaustion toward one backend. One local IP reaches one backend
//! `IP:port` from at most the ephemeral port range; `--connect-from` adds addresses, and running
//! out must fail one client cleanly, not the process. The test runs in a network namespace of
//! its own, where the port range can be cut to a few ports.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream};

use common::*;

/// The ephemeral range in the test's namespace, set once every listener is bound: outside
/// the default range (32768-60999), so no listener holds one of these ports.
const FIRST_PORT: u16 = 61_000;
const PORTS: usize = 8;

/// A `hold` session from client `i`: the backend's name once it is established, or the error
/// that turned it away.
fn hold(i: u32, to: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = connect_from(client_ip(i), to, DEADLINE)?;
    send_command(&mut s, "hold")?;
    read_line(&mut s)?;
    Ok(s)
}

/// Hold sessions from clients `first..` until one is turned away; the held ones.
fn hold_until_refused(first: u32, to: SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in first..first + 4 * PORTS as u32 {
        match hold(i, to) {
            Ok(s) => held.push(s),
            Err(e) => {
                // Refused at once (reset or EOF), not left hanging until the read timeout.
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "client {i} was left hanging: {e}"
                );
                return held;
            }
        }
    }
    panic!("{} sessions held from {PORTS} ports: the range was not cut", held.len())
}

fn ports_exhausted(t: &Tether) -> f64 {
    scrape(t, "tether_ports_exhausted_total", "")
}

#[test]
fn connect_from_addresses_multiply_the_ports_toward_a_backend_and_running_out_fails_cleanly() {
    if !inside_own_netns(
        "connect_from_addresses_multiply_the_ports_toward_a_backend_and_running_out_fails_cleanly",
    ) {
        return;
    }
    let pool = backends(47, 1);
    let plain = tether_with_admin(47, &pool, &[]);
    let pooled = tether_with_admin(
        47,
        &pool,
        &["--connect-from", "127.0.47.3", "--connect-from", "127.0.47.4"],
    );
    let game = UdpBackend::start("u0", "127.0.47.20:0".parse().unwrap()).unwrap();
    let udp = Tether::start(
        bin(),
        no_probes(&[
            "--listen".into(),
            "127.0.47.5:0".into(),
            "--admin".into(),
            "127.0.47.5:0".into(),
            "--protocol".into(),
            "udp".into(),
            "--backend".into(),
            format!("{},name=u0", game.addr()),
            "--connect-from".into(),
            "127.0.47.6".into(),
            "--connect-from".into(),
            "127.0.47.7".into(),
        ]),
    )
    .unwrap();
    set_local_port_range(FIRST_PORT, FIRST_PORT + PORTS as u16 - 1).unwrap();

    // From the kernel's one source address: as many sessions as ports, then a clean refusal.
    let mut held = hold_until_refused(0, plain.addr());
    assert_eq!(held.len(), PORTS, "sessions through one source address");
    assert!(ports_exhausted(&plain) >= 1.0);
    for s in held.iter_mut() {
        send_command(s, "x").unwrap(); // ends the hold: the backend closes, the session ends
    }
    drop(held);

    // From two addresses: twice as many, half from each.
    let before = pool[0].log().len();
    let held = hold_until_refused(1000, pooled.addr());
    assert_eq!(held.len(), 2 * PORTS, "sessions through two connect-from addresses");
    // The backend logs a hold just after answering it.
    let started =
        |log: &[Event]| log[before..].iter().filter(|e| e.outcome == Outcome::Started).count();
    assert!(pool[0].wait_for(|log| started(log) == 2 * PORTS, DEADLINE));
    let mut by_source = BTreeMap::<IpAddr, usize>::new();
    for e in &pool[0].log()[before..] {
        if e.outcome == Outcome::Started {
            *by_source.entry(e.peer.ip()).or_default() += 1;
        }
    }
    let want: BTreeMap<IpAddr, usize> = [("127.0.47.3", PORTS), ("127.0.47.4", PORTS)]
        .map(|(ip, n)| (ip.parse().unwrap(), n))
        .into();
    assert_eq!(by_source, want);
    assert!(ports_exhausted(&pooled) >= 1.0);
    assert!(
        pooled.wait_stderr(|l| l.contains("no local port toward"), DEADLINE),
        "{}",
        pooled.stderr_text()
    );

    // A port comes back when a session ends: new clients are served again.
    drop(held);
    assert!(
        wait_until(DEADLINE, || hold(5000, pooled.addr()).is_ok()),
        "no session after ports came back: {}",
        pooled.stderr_text()
    );

    // UDP: a flow's socket holds a port of its local address whatever the destination, so
    // two addresses give twice the range of flows, half from each; the next flow's datagram is
    // dropped and counted.
    let to = udp.udp_addrs()[0];
    let clients: Vec<_> =
        (0..2 * PORTS as u32 + 1).map(|i| udp_client(client_ip(7000 + i)).unwrap()).collect();
    for (i, c) in clients[..2 * PORTS].iter().enumerate() {
        let (reply, _) = udp_ask(c, to, b"hello", DEADLINE)
            .unwrap_or_else(|e| panic!("flow {i} got no reply: {e}: {}", udp.stderr_text()));
        assert!(!reply.is_empty());
    }
    let mut per_ip = BTreeMap::<IpAddr, usize>::new();
    for source in game.sources() {
        *per_ip.entry(source.ip()).or_default() += 1;
    }
    let want: BTreeMap<IpAddr, usize> = [("127.0.47.6", PORTS), ("127.0.47.7", PORTS)]
        .map(|(ip, n)| (ip.parse().unwrap(), n))
        .into();
    assert_eq!(per_ip, want, "flows' local addresses");
    clients[2 * PORTS].send_to(b"hello", to).unwrap();
    assert!(
        wait_until(DEADLINE, || ports_exhausted(&udp) >= 1.0),
        "the flow past the ports was not counted: {}",
        udp.stderr_text()
    );
}
