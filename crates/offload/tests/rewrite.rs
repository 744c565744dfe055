//! The program on `lo` of a network namespace of the test's own (root: CAP_BPF and
//! CAP_NET_ADMIN): entries rewrite datagrams both ways and count them, datagrams without an
//! entry reach their sockets untouched, and nothing stays attached once the handle is gone.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use tether_offload::{Attachment, FlowMap, Offload, Tuple};

const WAIT: Duration = Duration::from_secs(10);

/// Run `f` on a thread of its own in a new network namespace with `lo` up.
fn in_own_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): these tests need root");
            // A child started from this thread lives in its namespace.
            let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
            assert!(up.as_ref().is_ok_and(|s| s.success()), "ip link set lo up: {up:?}");
            f()
        })
        .join()
        .expect("the namespace thread panicked")
    })
}

fn bind(addr: &str) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn addr(s: &UdpSocket) -> SocketAddr {
    s.local_addr().unwrap()
}

/// One flow through "tether" at `listener`, from `client` to `backend` over `flow` (tether's
/// socket toward the backend): both entries in, three round trips, each checked and counted.
fn round_trips(off: &mut FlowMap, ips: [&str; 4]) {
    let [client_ip, listener_ip, flow_ip, backend_ip] = ips;
    let client = bind(&format!("{client_ip}:0"));
    let listener = bind(&format!("{listener_ip}:0"));
    let flow = bind(&format!("{flow_ip}:0"));
    let backend = bind(&format!("{backend_ip}:0"));
    let there = Tuple::new(addr(&client), addr(&listener));
    let back = Tuple::new(addr(&backend), addr(&flow));
    off.insert(back, Tuple::new(addr(&listener), addr(&client)), 0).unwrap();
    off.insert(there, Tuple::new(addr(&flow), addr(&backend)), 0).unwrap();
    let mut buf = [0u8; 64];
    for i in 0..3 {
        let ping = format!("ping {i}");
        client.send_to(ping.as_bytes(), addr(&listener)).unwrap();
        let (n, from) = backend.recv_from(&mut buf).expect("the backend gets the datagram");
        assert_eq!((&buf[..n], from), (ping.as_bytes(), addr(&flow)), "client -> backend");
        backend.send_to(format!("pong {i}").as_bytes(), from).unwrap();
        let (n, from) = client.recv_from(&mut buf).expect("the client gets the reply");
        assert_eq!((&buf[..n], from), (format!("pong {i}").as_bytes(), addr(&listener)));
    }
    let seen = off.seen(&there).unwrap();
    assert_eq!((seen.packets, seen.bytes), (3, 18), "{seen:?}");
    assert!(seen.last_seen_ns > 0);
    assert_eq!(off.seen(&back).map(|s| (s.packets, s.bytes)), Some((3, 18)));
    // Nothing was read by tether's own sockets.
    listener.set_nonblocking(true).unwrap();
    flow.set_nonblocking(true).unwrap();
    assert!(listener.recv_from(&mut buf).is_err() && flow.recv_from(&mut buf).is_err());
    // Another client has no entry: its datagram reaches the listener as sent.
    let stranger = bind(&format!("{client_ip}:0"));
    stranger.send_to(b"hello", addr(&listener)).unwrap();
    listener.set_nonblocking(false).unwrap();
    let (n, from) = listener.recv_from(&mut buf).expect("an entry-less datagram goes up");
    assert_eq!((&buf[..n], from), (&b"hello"[..], addr(&stranger)));
    // Without its entry the flow's datagrams go up to the sockets again.
    assert!(off.remove(&there));
    assert!(!off.remove(&there), "removed twice");
    client.send_to(b"again", addr(&listener)).unwrap();
    let (n, from) = listener.recv_from(&mut buf).expect("the listener gets it");
    assert_eq!((&buf[..n], from), (&b"again"[..], addr(&client)));
}

#[test]
fn entries_rewrite_ipv4_datagrams_both_ways_and_count_them() {
    in_own_netns(|| {
        let off = Offload::attach(&["lo"], 64).expect("attach");
        assert_eq!(off.attachment(), Attachment::Tcx, "this kernel has tcx (6.6+)");
        round_trips(
            &mut off.flow_map().unwrap(),
            ["127.0.0.2", "127.0.0.1", "127.0.0.1", "127.0.0.3"],
        );
    });
}

#[test]
fn entries_rewrite_ipv6_datagrams_both_ways_and_count_them() {
    in_own_netns(|| {
        let off = Offload::attach(&["lo"], 64).expect("attach");
        round_trips(&mut off.flow_map().unwrap(), ["[::1]"; 4]);
    });
}

#[test]
fn once_dropped_nothing_stays_attached() {
    in_own_netns(|| {
        let client = bind("127.0.0.2:0");
        let listener = bind("127.0.0.1:0");
        let backend = bind("127.0.0.3:0");
        let off = Offload::attach(&["lo"], 8).expect("attach");
        let mut map = off.flow_map().unwrap();
        let there = Tuple::new(addr(&client), addr(&listener));
        map.insert(there, Tuple::new(addr(&listener), addr(&backend)), 0).unwrap();
        // The program goes with the Offload, even while a worker's handle on the map lives.
        drop(off);
        client.send_to(b"plain", addr(&listener)).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = listener.recv_from(&mut buf).expect("not rewritten any more");
        assert_eq!((&buf[..n], from), (&b"plain"[..], addr(&client)));
    });
}

/// Set in the child process of the SIGKILL test: the addresses of its one entry.
const CHILD: &str = "TETHER_OFFLOAD_TEST_CHILD";

#[test]
fn a_process_killed_with_sigkill_leaves_nothing_that_rewrites() {
    if let Ok(spec) = std::env::var(CHILD) {
        // The child: attach, add the entry, say so, and wait to be killed.
        let a: Vec<SocketAddr> = spec.split(',').map(|s| s.parse().unwrap()).collect();
        let off = Offload::attach(&["lo"], 8).expect("attach in the child");
        let mut map = off.flow_map().unwrap();
        map.insert(Tuple::new(a[0], a[1]), Tuple::new(a[1], a[2]), 0).unwrap();
        println!("attached");
        loop {
            std::thread::park();
        }
    }
    in_own_netns(|| {
        use std::io::BufRead;
        let client = bind("127.0.0.2:0");
        let listener = bind("127.0.0.1:0");
        let backend = bind("127.0.0.3:0");
        let spec = format!("{},{},{}", addr(&client), addr(&listener), addr(&backend));
        // This test binary again, in this namespace (a child of this thread lives in it).
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "a_process_killed_with_sigkill_leaves_nothing_that_rewrites"])
            .args(["--nocapture", "--test-threads", "1"])
            .env(CHILD, spec)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(lines.any(|l| l.is_ok_and(|l| l.contains("attached"))), "the child never attached");
        let mut buf = [0u8; 16];
        client.send_to(b"kept", addr(&listener)).unwrap();
        let (n, _) = backend.recv_from(&mut buf).expect("the child's entry rewrites");
        assert_eq!(&buf[..n], b"kept");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        client.send_to(b"plain", addr(&listener)).unwrap();
        let (n, from) = listener.recv_from(&mut buf).expect("nothing rewrites after SIGKILL");
        assert_eq!((&buf[..n], from), (&b"plain"[..], addr(&client)));
        // A new process starts clean.
        let off = Offload::attach(&["lo"], 8).expect("attach again");
        assert!(off
            .flow_map()
            .unwrap()
            .seen(&Tuple::new(addr(&client), addr(&listener)))
            .is_none());
    });
}

/// Three hosts joined by veth pairs: client (10.77.1.2) -- balancer (10.77.1.1 | 10.77.2.1)
/// -- backend (10.77.2.2). The program on the balancer's two interfaces forwards a flow between
/// them (route looked up, redirected out of the other interface), replies come back from the
/// listener's address, and the receivers' checksum error counters stay at 0, also for
/// datagrams whose checksum the client computed in software (a raw socket, no offload).
#[test]
fn flows_are_redirected_between_interfaces_with_checksums_right() {
    use testkit::Namespace;
    in_own_netns(|| {
        let client_ns = Namespace::new().expect("a client namespace");
        let backend_ns = Namespace::new().expect("a backend namespace");
        testkit::sh(&format!(
            "ip link add c1 type veth peer name c0 netns {c}
             ip link add b1 type veth peer name b0 netns {b}
             ip addr add 10.77.1.1/24 dev c1; ip -6 addr add fd77:1::1/64 dev c1 nodad
             ip addr add 10.77.2.1/24 dev b1; ip -6 addr add fd77:2::1/64 dev b1 nodad
             ip link set c1 up; ip link set b1 up",
            c = client_ns.tid,
            b = backend_ns.tid,
        ));
        // The senders' checksum offload off: datagrams leave with full software checksums.
        client_ns.sh("ip addr add 10.77.1.2/24 dev c0; ip -6 addr add fd77:1::2/64 dev c0 nodad
             ip link set c0 up; ethtool -K c0 tx off >/dev/null");
        backend_ns.sh("ip addr add 10.77.2.2/24 dev b0; ip -6 addr add fd77:2::2/64 dev b0 nodad
             ip link set b0 up; ethtool -K b0 tx off >/dev/null");
        let off = Offload::attach(&["c1", "b1"], 64).expect("attach");
        let mut map = off.flow_map().unwrap();
        let mut routes = tether_offload::route::Routes::new().unwrap();
        let listener = bind("10.77.1.1:0");
        let flow = bind("10.77.2.1:0");
        let client = client_ns.run(|| bind("10.77.1.2:0"));
        let backend = backend_ns.run(|| bind("10.77.2.2:0"));
        let (l, f, c, b) = (addr(&listener), addr(&flow), addr(&client), addr(&backend));
        let to_backend = routes.egress(f.ip(), b.ip()).unwrap();
        let to_client = routes.egress(l.ip(), c.ip()).unwrap();
        let index = |name: &str| nix::net::if_::if_nametoindex(name).unwrap();
        assert_eq!(to_backend.oif(), index("b1"), "{to_backend:?}");
        assert_eq!(to_client.oif(), index("c1"), "{to_client:?}");
        map.insert(Tuple::new(c, l), Tuple::new(f, b), to_backend.oif()).unwrap();
        map.insert(Tuple::new(b, f), Tuple::new(l, c), to_client.oif()).unwrap();
        let mut buf = [0u8; 64];
        for i in 0..3 {
            let ping = format!("ping {i}");
            if i == 2 {
                client_ns.run(|| testkit::inject_udp4(c, l, ping.as_bytes(), false));
            } else {
                client.send_to(ping.as_bytes(), l).unwrap();
            }
            let (n, from) = backend.recv_from(&mut buf).expect("the backend gets the datagram");
            assert_eq!((&buf[..n], from), (ping.as_bytes(), f), "client -> backend");
            backend.send_to(format!("pong {i}").as_bytes(), from).unwrap();
            let (n, from) = client.recv_from(&mut buf).expect("the client gets the reply");
            assert_eq!((&buf[..n], from), (format!("pong {i}").as_bytes(), l));
        }
        assert_eq!(map.seen(&Tuple::new(c, l)).map(|s| s.packets), Some(3));
        assert_eq!(map.seen(&Tuple::new(b, f)).map(|s| s.packets), Some(3));
        assert_eq!(backend_ns.snmp("Udp", "InCsumErrors"), 0);
        assert_eq!(client_ns.snmp("Udp", "InCsumErrors"), 0);
        // The counter does count: a datagram with a broken checksum, rewritten and forwarded,
        // is an error at the backend (and is not delivered).
        client_ns.run(|| testkit::inject_udp4(c, l, b"broken", true));
        let counted = testkit::wait_until(WAIT, || backend_ns.snmp("Udp", "InCsumErrors") == 1);
        assert!(counted, "the backend never counted the broken checksum");
        // Nothing went through tether's own sockets.
        listener.set_nonblocking(true).unwrap();
        flow.set_nonblocking(true).unwrap();
        assert!(listener.recv_from(&mut buf).is_err() && flow.recv_from(&mut buf).is_err());
        // IPv6 the same way (no IP header checksum: the UDP one covers the addresses).
        let listener = bind("[fd77:1::1]:0");
        let flow = bind("[fd77:2::1]:0");
        let client = client_ns.run(|| bind("[fd77:1::2]:0"));
        let backend = backend_ns.run(|| bind("[fd77:2::2]:0"));
        let (l, f, c, b) = (addr(&listener), addr(&flow), addr(&client), addr(&backend));
        let to_backend = routes.egress(f.ip(), b.ip()).unwrap().oif();
        let to_client = routes.egress(l.ip(), c.ip()).unwrap().oif();
        assert_eq!((to_backend, to_client), (index("b1"), index("c1")));
        map.insert(Tuple::new(c, l), Tuple::new(f, b), to_backend).unwrap();
        map.insert(Tuple::new(b, f), Tuple::new(l, c), to_client).unwrap();
        for i in 0..3 {
            let ping = format!("ping6 {i}");
            client.send_to(ping.as_bytes(), l).unwrap();
            let (n, from) = backend.recv_from(&mut buf).expect("the backend gets the datagram");
            assert_eq!((&buf[..n], from), (ping.as_bytes(), f), "client -> backend");
            backend.send_to(format!("pong6 {i}").as_bytes(), from).unwrap();
            let (n, from) = client.recv_from(&mut buf).expect("the client gets the reply");
            assert_eq!((&buf[..n], from), (format!("pong6 {i}").as_bytes(), l));
        }
        assert_eq!(map.seen(&Tuple::new(c, l)).map(|s| s.packets), Some(3));
        assert_eq!(backend_ns.snmp("Udp6", "InCsumErrors"), 0);
        assert_eq!(client_ns.snmp("Udp6", "InCsumErrors"), 0);
    });
}
