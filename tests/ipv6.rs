//! IPv6 listeners and backends, and a dual-stack [::] listener taking IPv4 clients.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::*;

const V6_LOOPBACK: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

#[test]
fn ipv6_listener_and_backends_carry_tcp_and_udp() {
    let tcp = Backend::start("v6", SocketAddr::new(V6_LOOPBACK, 0)).unwrap();
    let _udp = UdpBackend::start("v6", tcp.addr()).unwrap();
    let args = [
        "--listen".to_string(),
        "[::1]:0".into(),
        "--protocol".into(),
        "both".into(),
        "--backend".into(),
        format!("{},name=v6", tcp.addr()),
    ];
    let t = Tether::start(bin(), no_probes(&args)).unwrap();
    assert!(t.addr().is_ipv6());
    assert_eq!(ask_name(V6_LOOPBACK, t.addr()).unwrap(), "v6");
    let socket = udp_client(V6_LOOPBACK).unwrap();
    let (reply, from) = udp_ask(&socket, t.udp_addr(), b"name", Duration::from_secs(5)).unwrap();
    assert_eq!((reply.as_slice(), from), (&b"v6"[..], t.udp_addr()));
    // The backend saw tether connect over IPv6.
    assert!(tcp.log().iter().all(|e| e.peer.is_ipv6()));
}

#[test]
fn dual_stack_listener_serves_ipv4_clients_with_one_pin_for_tcp_and_udp() {
    let tcp = backends(58, 3);
    let udp: Vec<UdpBackend> =
        tcp.iter().map(|b| UdpBackend::start(b.name(), b.addr()).unwrap()).collect();
    let mut args =
        vec!["--listen".to_string(), "[::]:0".into(), "--protocol".into(), "both".into()];
    args.extend(backend_args(&tcp));
    let t = Tether::start(bin(), no_probes(&args)).unwrap();
    let port = t.addr().port();
    // IPv4 clients reach the [::] listener through its IPv4 side (as ::ffff:a.b.c.d).
    let v4_tcp = SocketAddr::from(([127, 0, 58, 1], port));
    let v4_udp = SocketAddr::from(([127, 0, 58, 1], t.udp_addr().port()));
    for i in 0..20 {
        let by_tcp = ask_name(client_ip(i), v4_tcp).unwrap();
        let socket = udp_client(client_ip(i)).unwrap();
        let (reply, from) = udp_ask(&socket, v4_udp, b"name", Duration::from_secs(5)).unwrap();
        // The reply leaves from the IPv4 address the client sent to.
        assert_eq!(from, v4_udp);
        assert_eq!(String::from_utf8(reply).unwrap(), by_tcp, "client {}", client_ip(i));
    }
    drop(udp);
}
