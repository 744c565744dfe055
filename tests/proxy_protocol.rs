//! The PROXY protocol (haproxy's spec), both ways (issue 6): headers sent to backends are
//! byte-exact; headers from trusted proxies change affinity and ACL decisions, are refused from
//! anyone else, and a malformed one closes only its own connection.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use common::*;

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 PROXY header for IPv4, written out by hand from the spec (not by tether's encoder).
fn v2_header(udp: bool, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else { panic!("IPv4 only") };
    let mut h = SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(if udp { 0x12 } else { 0x11 }); // AF_INET, DGRAM or STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// A TCP backend that records, per connection, every byte until the peer closes.
fn raw_backend(addr: &str) -> (SocketAddr, std::sync::mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind(addr).unwrap();
    let at = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Bounded: a test makes a handful of connections; the thread ends with the process.
        for stream in listener.incoming().take(16) {
            let Ok(mut s) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got);
                let _ = tx.send(got);
            });
        }
    });
    (at, rx)
}

/// Send `payload` from `source` through tether and half-close; returns the client's address.
fn send_and_close(source: IpAddr, to: SocketAddr, payload: &[u8]) -> SocketAddr {
    let mut s = connect_from(source, to, DEADLINE).unwrap();
    s.write_all(payload).unwrap();
    let me = s.local_addr().unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    me
}

fn tether_to(backend: SocketAddr, listen: &str, extra: &[&str]) -> Tether {
    let mut args = vec!["--listen".to_string(), listen.to_string(), "--backend".into()];
    args.push(format!("{backend},name=raw"));
    args.extend(extra.iter().map(|s| s.to_string()));
    Tether::start(bin(), no_probes(&args)).unwrap()
}

#[test]
fn a_v1_header_sent_to_the_backend_is_byte_exact() {
    let (backend, got) = raw_backend("127.0.92.10:0");
    let t = tether_to(backend, "127.0.92.1:0", &["--send-proxy", "v1"]);
    let me = send_and_close(client_ip(5), t.addr(), b"hello");
    let bytes = got.recv_timeout(DEADLINE).unwrap();
    let want = format!(
        "PROXY TCP4 {} {} {} {}\r\nhello",
        me.ip(),
        t.addr().ip(),
        me.port(),
        t.addr().port()
    );
    assert_eq!(String::from_utf8_lossy(&bytes), want);
}

#[test]
fn a_v2_header_sent_to_the_backend_is_byte_exact() {
    let (backend, got) = raw_backend("127.0.93.10:0");
    let t = tether_to(backend, "127.0.93.1:0", &["--send-proxy", "v2"]);
    let me = send_and_close(client_ip(6), t.addr(), b"hello");
    let bytes = got.recv_timeout(DEADLINE).unwrap();
    let mut want = v2_header(false, me, t.addr());
    want.extend_from_slice(b"hello");
    assert_eq!(bytes, want);
}

#[test]
fn udp_flows_send_a_v2_header_on_the_first_datagram_or_on_every_one() {
    for every in [false, true] {
        let backend = UdpSocket::bind("127.0.94.10:0").unwrap();
        backend.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut extra = vec!["--protocol", "udp", "--send-proxy", "v2"];
        if every {
            extra.push("--send-proxy-every-datagram");
        }
        let listen = if every { "127.0.94.2:0" } else { "127.0.94.1:0" };
        let t = tether_to(backend.local_addr().unwrap(), listen, &extra);
        let client = udp_client(client_ip(7)).unwrap();
        let me = client.local_addr().unwrap();
        let mut buf = vec![0u8; 2048];
        for (i, payload) in [&b"ping"[..], b"ping2"].into_iter().enumerate() {
            client.send_to(payload, t.udp_addr()).unwrap();
            let (n, flow) = backend.recv_from(&mut buf).unwrap();
            let mut want = if i == 0 || every { v2_header(true, me, t.udp_addr()) } else { vec![] };
            want.extend_from_slice(payload);
            assert_eq!(&buf[..n], &want[..], "datagram {i} (every: {every})");
            // The reply goes back to the client without any header.
            backend.send_to(b"pong", flow).unwrap();
            let (reply, _) = udp_ask_reply(&client);
            assert_eq!(reply, b"pong");
        }
    }
}

fn udp_ask_reply(client: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, from) = client.recv_from(&mut buf).unwrap();
    (buf[..n].to_vec(), from)
}

/// Send raw bytes (a header, then a command) and read the whole answer; `None` when the
/// connection was reset or closed without a byte.
fn exchange(source: IpAddr, to: SocketAddr, bytes: &[u8]) -> Option<String> {
    let mut s = connect_from(source, to, DEADLINE).ok()?;
    s.write_all(bytes).ok()?;
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) if !reply.is_empty() => Some(String::from_utf8_lossy(&reply).into_owned()),
        _ => None,
    }
}

fn v1(src: &str, sport: u16, dst: SocketAddr) -> String {
    format!("PROXY TCP4 {src} {} {sport} {}\r\n", dst.ip(), dst.port())
}

#[test]
fn headers_from_trusted_proxies_decide_affinity_and_acl_and_nobody_else_is_believed() {
    let pool = backends(95, 3);
    // The proxies are 127.1.0.x; clients from 127.1.1.x connect directly.
    let t = tether_with_admin(
        95,
        &pool,
        &[
            "--accept-proxy",
            "--trusted-proxies",
            "127.1.0.0/24",
            "--deny",
            "10.0.0.0/8",
            "--proxy-header-timeout",
            "500ms",
        ],
    );
    let to = t.addr();
    // One real client behind several proxies: one sticky entry, one backend.
    let first =
        exchange(client_ip(1), to, format!("{}name\n", v1("192.0.2.7", 4000, to)).as_bytes());
    let first = first.expect("served through a trusted proxy");
    for proxy in [2u32, 3, 4] {
        let again = format!("{}name\n", v1("192.0.2.7", 4001 + proxy as u16, to));
        assert_eq!(exchange(client_ip(proxy), to, again.as_bytes()).as_deref(), Some(&*first));
    }
    let pin = http(t.admin(), "GET", "/api/sticky?client=192.0.2.7", "").unwrap().body;
    assert!(pin.contains(&format!("\"backend\":\"{}\"", first.trim())), "{pin}");
    // v2 works the same.
    let mut v2 = v2_header(false, "192.0.2.7:4100".parse().unwrap(), to);
    v2.extend_from_slice(b"name\n");
    assert_eq!(exchange(client_ip(5), to, &v2).as_deref(), Some(&*first));
    // The ACL judges the real client: 10.1.2.3 is denied through a trusted proxy.
    assert_eq!(
        exchange(client_ip(6), to, format!("{}name\n", v1("10.1.2.3", 1, to)).as_bytes()),
        None
    );
    // From anyone else a header is not believed: it is data, and the backend does not know
    // the command it makes.
    let untrusted =
        exchange(client_ip(300), to, format!("{}name\n", v1("192.0.2.7", 4000, to)).as_bytes());
    assert!(untrusted.is_some_and(|r| r.starts_with("error")), "a header from an untrusted source");
    assert!(ask_name(client_ip(301), to).is_ok(), "untrusted clients without a header are served");
    // A trusted proxy must send one: without it, or too slowly, the connection is closed.
    assert_eq!(exchange(client_ip(7), to, b"name\n"), None);
    let mut silent = connect_from(client_ip(8), to, DEADLINE).unwrap();
    let mut nothing = Vec::new();
    assert!(silent.read_to_end(&mut nothing).is_err() || nothing.is_empty());
    let m = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    assert!(m.contains("tether_proxy_header_errors_total 2"), "{m}");
}

#[test]
fn per_source_limits_count_the_real_client_behind_its_proxies() {
    let pool = backends(99, 1);
    let t = tether(
        99,
        &pool,
        &["--accept-proxy", "--trusted-proxies", "127.1.0.0/24", "--max-conns-per-source", "1"],
    );
    let to = t.addr();
    // Client 192.0.2.30 holds a session through one proxy...
    let mut held = connect_from(client_ip(1), to, DEADLINE).unwrap();
    held.write_all(format!("{}hold\n", v1("192.0.2.30", 1, to)).as_bytes()).unwrap();
    assert_eq!(read_line(&mut held).unwrap(), "b0");
    // ...so a second session of the same client through another proxy is refused,
    assert_eq!(
        exchange(client_ip(2), to, format!("{}name\n", v1("192.0.2.30", 2, to)).as_bytes()),
        None
    );
    // while another client through that same proxy is served.
    let other = format!("{}name\n", v1("192.0.2.31", 3, to));
    assert_eq!(exchange(client_ip(2), to, other.as_bytes()).as_deref(), Some("b0\n"));
    drop(held);
}

#[test]
fn a_malformed_header_closes_only_its_own_connection() {
    let pool = backends(96, 1);
    let t = tether_with_admin(96, &pool, &["--accept-proxy", "--trusted-proxies", "127.1.0.0/24"]);
    let to = t.addr();
    // A session in progress through the same proxy address range.
    let mut live = connect_from(client_ip(1), to, DEADLINE).unwrap();
    live.write_all(format!("{}echo\n", v1("192.0.2.1", 1, to)).as_bytes()).unwrap();
    echo_roundtrip(&mut live, "before").unwrap();
    let mut bad_version = v2_header(false, "192.0.2.2:1".parse().unwrap(), to);
    bad_version[12] = 0x31;
    let mut short_len = v2_header(false, "192.0.2.2:1".parse().unwrap(), to);
    short_len[14..16].copy_from_slice(&4u16.to_be_bytes()); // too short for two IPv4 addresses
    let mut overrun = v2_header(false, "192.0.2.2:1".parse().unwrap(), to);
    overrun[14..16].copy_from_slice(&(12u16 + 3).to_be_bytes());
    overrun.extend_from_slice(&[0x04, 0x00, 0x09]); // a NOOP TLV claiming 9 bytes of 0
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "v1 line without CRLF past 107 bytes",
            format!("PROXY TCP4 {}", "1".repeat(200)).into_bytes(),
        ),
        ("v1 with a port out of range", b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 80\r\n".to_vec()),
        ("v1 with an IPv6 address in TCP4", b"PROXY TCP4 ::1 5.6.7.8 1 80\r\n".to_vec()),
        ("v2 with version 3", bad_version),
        ("v2 length shorter than its addresses", short_len),
        ("v2 TLV overrunning the header", overrun),
        ("not a header at all", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        ("NUL bytes", vec![0u8; 64]),
    ];
    for (what, bytes) in &cases {
        assert_eq!(exchange(client_ip(2), to, bytes), None, "{what}: the connection was served");
    }
    echo_roundtrip(&mut live, "after").unwrap();
    let m = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    assert!(m.contains(&format!("tether_proxy_header_errors_total {}", cases.len())), "{m}");
    assert!(ask_name(client_ip(300), to).is_ok());
}

#[test]
fn udp_headers_from_trusted_proxies_name_the_client_and_are_required_on_a_new_flow() {
    let pool: Vec<UdpBackend> = (0..3)
        .map(|i| {
            let ip = Ipv4Addr::new(127, 0, 97, 10 + i);
            UdpBackend::start(&format!("u{i}"), SocketAddr::new(ip.into(), 0)).unwrap()
        })
        .collect();
    let mut args = vec!["--listen".to_string(), "127.0.97.1:0".into(), "--protocol".into()];
    args.extend(["udp".into(), "--accept-proxy".into(), "--trusted-proxies".into()]);
    args.extend(["127.1.0.0/24".into(), "--deny".into(), "10.0.0.0/8".into()]);
    args.extend(["--admin".into(), "127.0.97.1:0".into()]);
    for b in &pool {
        args.extend(["--backend".into(), format!("{},name={}", b.addr(), b.name())]);
    }
    let t = Tether::start(bin(), no_probes(&args)).unwrap();
    let to = t.udp_addr();
    let ask = |proxy: u32, real: &str, payload: &[u8]| -> Option<Vec<u8>> {
        let s = udp_client(client_ip(proxy)).unwrap();
        let mut d = v2_header(true, real.parse().unwrap(), to);
        d.extend_from_slice(payload);
        udp_ask(&s, to, &d, Duration::from_secs(2)).ok().map(|(r, _)| r)
    };
    let first = ask(1, "192.0.2.9:7000", b"name").expect("served through a trusted proxy");
    for proxy in 2..6 {
        assert_eq!(ask(proxy, "192.0.2.9:7001", b"name").as_deref(), Some(&first[..]));
    }
    assert_eq!(ask(6, "10.9.9.9:1", b"name"), None, "the ACL judges the real client");
    // A new flow from a trusted proxy without a header: dropped.
    let bare = udp_client(client_ip(7)).unwrap();
    assert!(udp_ask(&bare, to, b"name", Duration::from_millis(300)).is_err());
    let m = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    assert!(m.contains("tether_proxy_header_errors_total 1"), "{m}");
    // A flow is one client: a header naming another client on it is dropped and counted.
    let relay = udp_client(client_ip(8)).unwrap();
    let mut d = v2_header(true, "192.0.2.20:1".parse().unwrap(), to);
    d.extend_from_slice(b"name");
    assert!(udp_ask(&relay, to, &d, DEADLINE).is_ok());
    let mut other = v2_header(true, "10.9.9.9:1".parse().unwrap(), to);
    other.extend_from_slice(b"name");
    assert!(udp_ask(&relay, to, &other, Duration::from_millis(300)).is_err());
    let m = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    assert!(m.contains("tether_proxy_header_errors_total 2"), "{m}");
    // Its own client's later datagrams, with or without a header, still pass.
    assert!(udp_ask(&relay, to, &d, DEADLINE).is_ok());
    assert!(udp_ask(&relay, to, b"name", DEADLINE).is_ok());
    // An untrusted client is served as itself, header-less.
    let direct = udp_client(client_ip(300)).unwrap();
    assert!(udp_ask(&direct, to, b"name", DEADLINE).is_ok());
}

/// A backend that, like HAProxy's `accept-proxy`, requires a PROXY header on every connection.
/// Returns its address and a channel of what it made of each connection: `Ok(local)` for a
/// LOCAL header (v2 LOCAL or v1 UNKNOWN) followed by the close, an error otherwise.
fn proxy_requiring_backend(
    addr: &str,
) -> (SocketAddr, std::sync::mpsc::Receiver<Result<(), String>>) {
    let listener = TcpListener::bind(addr).unwrap();
    let at = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Bounded: probes come every 100 ms and the test reads at most a few dozen.
        for stream in listener.incoming().take(200) {
            let Ok(mut s) = stream else { continue };
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let verdict = match proxyproto::parse(&got) {
                Ok(proxyproto::Parsed::Complete { header, consumed }) => match header {
                    proxyproto::Header::Local { .. } if consumed == got.len() => Ok(()),
                    other => Err(format!("{other:?} then {} bytes", got.len() - consumed)),
                },
                // haproxy: "Connection closed while waiting for PROXY protocol header".
                Ok(proxyproto::Parsed::Incomplete { .. }) => {
                    Err(format!("closed while waiting for the header ({got:?})"))
                }
                Err(e) => Err(format!("{e:?}: {got:?}")),
            };
            if tx.send(verdict).is_err() {
                return;
            }
        }
    });
    (at, rx)
}

#[test]
fn health_probes_send_a_local_header_to_backends_that_require_one() {
    for (net, version) in [(105, "v2"), (106, "v1")] {
        let (backend, verdicts) = proxy_requiring_backend(&format!("127.0.{net}.10:0"));
        let listen = format!("127.0.{net}.1:0");
        let args = [
            "--listen",
            &listen,
            "--backend",
            &backend.to_string(),
            "--send-proxy",
            version,
            "--health-check",
            "tcp",
            "--health-interval",
            "100ms",
            "--health-timeout",
            "100ms",
        ];
        let t = Tether::start(bin(), args).expect("start tether");
        for i in 0..5 {
            let verdict = verdicts.recv_timeout(DEADLINE).expect("a probe");
            assert_eq!(verdict, Ok(()), "{version} probe {i}");
        }
        drop(t);
    }
    // Turned off, a probe connects and closes without a word, as before.
    let (backend, verdicts) = proxy_requiring_backend("127.0.107.10:0");
    let args = [
        "--listen",
        "127.0.107.1:0",
        "--backend",
        &backend.to_string(),
        "--send-proxy",
        "v2",
        "--health-check",
        "tcp",
        "--health-interval",
        "100ms",
        "--health-timeout",
        "100ms",
        "--health-send-proxy",
        "off",
    ];
    let _t = Tether::start(bin(), args).expect("start tether");
    let verdict = verdicts.recv_timeout(DEADLINE).expect("a probe");
    assert!(verdict.unwrap_err().contains("closed while waiting"));
}
