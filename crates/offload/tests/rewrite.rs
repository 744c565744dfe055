//! The program on `lo` of a network namespace of the test's own (root: CAP_BPF and
//! CAP_NET_ADMIN): entries rewrite datagrams both ways and count them, datagrams without an
//! entry reach their sockets untouched, and nothing stays attached once the handle is gone.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use tether_offload::{Attachment, Offload, Tuple};

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
fn round_trips(off: &mut Offload, ips: [&str; 4]) {
    let [client_ip, listener_ip, flow_ip, backend_ip] = ips;
    let client = bind(&format!("{client_ip}:0"));
    let listener = bind(&format!("{listener_ip}:0"));
    let flow = bind(&format!("{flow_ip}:0"));
    let backend = bind(&format!("{backend_ip}:0"));
    let there = Tuple::new(addr(&client), addr(&listener));
    let back = Tuple::new(addr(&backend), addr(&flow));
    off.insert(back, Tuple::new(addr(&listener), addr(&client))).unwrap();
    off.insert(there, Tuple::new(addr(&flow), addr(&backend))).unwrap();
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
        let mut off = Offload::attach("lo", 64).expect("attach");
        assert_eq!(off.attachment(), Attachment::Tcx, "this kernel has tcx (6.6+)");
        round_trips(&mut off, ["127.0.0.2", "127.0.0.1", "127.0.0.1", "127.0.0.3"]);
    });
}

#[test]
fn entries_rewrite_ipv6_datagrams_both_ways_and_count_them() {
    in_own_netns(|| {
        let mut off = Offload::attach("lo", 64).expect("attach");
        round_trips(&mut off, ["[::1]"; 4]);
    });
}

#[test]
fn once_dropped_nothing_stays_attached() {
    in_own_netns(|| {
        let client = bind("127.0.0.2:0");
        let listener = bind("127.0.0.1:0");
        let backend = bind("127.0.0.3:0");
        let mut off = Offload::attach("lo", 8).expect("attach");
        let there = Tuple::new(addr(&client), addr(&listener));
        off.insert(there, Tuple::new(addr(&listener), addr(&backend))).unwrap();
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
        let mut off = Offload::attach("lo", 8).expect("attach in the child");
        off.insert(Tuple::new(a[0], a[1]), Tuple::new(a[1], a[2])).unwrap();
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
        let off = Offload::attach("lo", 8).expect("attach again");
        assert!(off.seen(&Tuple::new(addr(&client), addr(&listener))).is_none());
    });
}
