//! `--udp-offload on` (issue 13), black-box: established flows forwarded by the kernel, and
//! everything tether does for a flow still done for them: counters, idle expiry, `on-down
//! kill` and maint, reloads that deny the client, a closed backend port (ICMP), PROXY headers,
//! IPv6, entries deleted under a flow, SIGKILL, and forwarding between interfaces of network
//! namespaces. Needs root (CAP_BPF, CAP_NET_ADMIN), as tether does for the offload.
//!
//! (tests/udp.rs runs issue 4's UDP tests once with the offload on and once off.)

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Time to wait for one reply: generous, the machine may be loaded.
const REPLY: Duration = Duration::from_secs(5);

/// A tether on `127.0.{net}.1` with the offload on, one worker per CPU, an admin address.
fn offload_tether(net: u8, backends: &[&UdpBackend], extra: &[&str]) -> Tether {
    let listen = format!("127.0.{net}.1:0");
    let mut args: Vec<String> =
        ["--protocol", "udp", "--udp-offload", "on", "--workers", "2"].map(String::from).to_vec();
    args.extend(["--listen".into(), listen.clone(), "--admin".into(), listen]);
    for b in backends {
        args.extend(["--backend".to_string(), format!("{},name={}", b.addr(), b.name())]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Tether::start(bin(), no_probes(&args)).expect("start tether")
}

fn backend(net: u8, i: u8) -> UdpBackend {
    let addr = SocketAddr::new(IpAddr::from([127, 0, net, 10 + i]), 0);
    UdpBackend::start(&format!("u{i}"), addr).expect("udp backend")
}

fn client(net: u8, i: u8) -> UdpSocket {
    udp_client(IpAddr::from([127, 0, net, 50 + i])).unwrap()
}

/// One echo round trip; the reply must come from `to`.
fn echo(c: &UdpSocket, to: SocketAddr, payload: &[u8]) {
    let (reply, from) = udp_ask(c, to, payload, REPLY).expect("an echo");
    assert_eq!((reply.as_slice(), from), (payload, to));
}

fn name_of(c: &UdpSocket, to: SocketAddr) -> String {
    let (reply, _) = udp_ask(c, to, b"name", REPLY).expect("a name");
    String::from_utf8(reply).unwrap()
}

/// Poll a metric until it reaches `want` (the program's counts are read every second).
fn wait_metric(t: &Tether, name: &str, label: &str, want: f64) {
    let mut last = 0.0;
    let reached = wait_until(DEADLINE, || {
        last = scrape(t, name, label);
        last == want
    });
    assert!(reached, "{name}{{{label}}} is {last}, expected {want}");
}

/// The entries of tether's flow map now.
fn entries(t: &Tether) -> usize {
    let (maps, _) = offload::held_by(t.pid());
    maps.iter().filter_map(|&id| offload::FlowMap::open(id).ok()).map(|m| m.len()).sum()
}

fn status(t: &Tether) -> Value {
    get_json(t.admin(), "/api/status")
}

#[test]
fn the_first_datagram_goes_through_user_space_and_the_rest_through_the_kernel() {
    let b = backend(130, 0);
    let t = offload_tether(130, &[&b], &[]);
    let s = status(&t);
    assert_eq!(s["udp_offload"]["enabled"], true, "{s}");
    assert_eq!(s["udp_offload"]["mode"], "on");
    assert!(s["udp_offload"]["interfaces"].as_array().unwrap().contains(&"lo".into()), "{s}");
    assert!(s["workers"].as_u64().unwrap() >= 1);
    assert_eq!(scrape(&t, "tether_udp_offload_enabled", ""), 1.0);
    let (c, to) = (client(130, 0), t.udp_addr());
    for i in 0..20 {
        echo(&c, to, format!("datagram {i:02}").as_bytes());
    }
    // The program carried all but the first datagram (its flow was made in user space, and
    // the entries went in before it was sent on, so every reply came back by the program).
    wait_metric(&t, "tether_udp_offloaded_datagrams_total", "", 39.0);
    assert_eq!(scrape(&t, "tether_flows_offloaded_total", ""), 1.0);
    assert_eq!(entries(&t), 2, "one flow, two entries");
    // Every datagram counted, whoever carried it: per worker, per backend, bytes too.
    assert_eq!(scrape(&t, "tether_datagrams_in_total", ""), 20.0);
    assert_eq!(scrape(&t, "tether_datagrams_out_total", ""), 20.0);
    assert_eq!(scrape(&t, "tether_backend_datagrams_in_total", "backend=\"u0\""), 20.0);
    assert_eq!(scrape(&t, "tether_backend_datagrams_out_total", "backend=\"u0\""), 20.0);
    assert_eq!(scrape(&t, "tether_backend_datagram_bytes_in_total", "backend=\"u0\""), 220.0);
    let api = api_backend(t.admin(), "u0");
    assert_eq!(
        (api["datagrams_in"].as_u64(), api["datagram_bytes_out"].as_u64()),
        (Some(20), Some(220))
    );
    assert_eq!(status(&t)["udp_offload"]["datagrams_total"], 39);
    // Per flow, from GET /api/flows (the workers read the program's entries when asked).
    let flows = get_json(t.admin(), "/api/flows");
    let f = &flows[0];
    assert_eq!(flows.as_array().map(Vec::len), Some(1), "{flows}");
    assert_eq!(f["client"], c.local_addr().unwrap().to_string());
    assert_eq!((f["backend"].as_str(), f["offloaded"].as_bool()), (Some("u0"), Some(true)));
    assert_eq!((f["datagrams_in"].as_u64(), f["datagrams_out"].as_u64()), (Some(20), Some(20)));
    assert_eq!((f["bytes_in"].as_u64(), f["bytes_out"].as_u64()), (Some(220), Some(220)));
    assert_eq!(f["local"], b.seen()[0].to_string(), "the flow's address is what u0 sees");
    // Its socket still holds that address: nothing else can take the port meanwhile.
    let taken = UdpSocket::bind(b.seen()[0]).map(|_| ()).map_err(|e| e.kind());
    assert_eq!(taken, Err(std::io::ErrorKind::AddrInUse));
    assert_eq!(get_json(t.admin(), "/api/flows?client=127.0.130.99"), serde_json::json!([]));
    let bad = http(t.admin(), "GET", "/api/flows?limit=0", "").unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    // One flow: the backend saw one source port.
    assert_eq!(b.sources().len(), 1);
}

#[test]
fn ipv6_flows_are_offloaded_too() {
    let b = UdpBackend::start("u0", "[::1]:0".parse().unwrap()).unwrap();
    let args = ["--protocol", "udp", "--udp-offload", "on", "--listen", "[::1]:0"];
    let mut args: Vec<String> = args.map(String::from).to_vec();
    args.extend(["--admin".into(), "127.0.131.1:0".into()]);
    args.extend(["--backend".into(), format!("{},name=u0", b.addr())]);
    let t = Tether::start(bin(), no_probes(&args)).expect("start tether");
    let c = UdpSocket::bind("[::1]:0").unwrap();
    for i in 0..6 {
        echo(&c, t.udp_addr(), format!("v6 {i}").as_bytes());
    }
    wait_metric(&t, "tether_udp_offloaded_datagrams_total", "", 11.0);
}

#[test]
fn a_flow_whose_entries_are_deleted_falls_back_to_user_space_and_is_offloaded_again() {
    let b = backend(132, 0);
    let t = offload_tether(132, &[&b], &[]);
    let (c, to) = (client(132, 0), t.udp_addr());
    for i in 0..10 {
        echo(&c, to, format!("before {i}").as_bytes());
    }
    wait_metric(&t, "tether_udp_offloaded_datagrams_total", "", 19.0);
    let (maps, _) = offload::held_by(t.pid());
    let cleared: usize =
        maps.iter().filter_map(|&id| offload::FlowMap::open(id).ok()).map(|mut m| m.clear()).sum();
    assert_eq!(cleared, 2);
    // Every datagram still answered, by tether's sockets now, on the same flow.
    for i in 0..10 {
        echo(&c, to, format!("after {i}").as_bytes());
    }
    assert_eq!(scrape(&t, "tether_datagrams_in_total", ""), 20.0);
    // The sweep notices, and the flow's next datagram hands it to the program again.
    let mut i = 0;
    let again = wait_until(DEADLINE, || {
        i += 1;
        echo(&c, to, format!("later {i}").as_bytes());
        scrape(&t, "tether_flows_offloaded_total", "") == 2.0
    });
    assert!(again, "the flow was never offloaded again");
    assert_eq!(entries(&t), 2);
    assert_eq!(b.sources().len(), 1, "one flow throughout: {:?}", b.sources());
    assert_eq!(scrape(&t, "tether_flows_created_total", ""), 1.0);
}

#[test]
fn tether_killed_with_sigkill_leaves_no_program_and_a_new_one_starts_clean() {
    let b = backend(133, 0);
    let mut t = offload_tether(133, &[&b], &[]);
    let (c, to) = (client(133, 0), t.udp_addr());
    for i in 0..3 {
        echo(&c, to, format!("{i}").as_bytes());
    }
    wait_metric(&t, "tether_udp_offloaded_datagrams_total", "", 5.0);
    let (maps, progs) = offload::held_by(t.pid());
    assert!(!maps.is_empty() && !progs.is_empty(), "maps {maps:?}, programs {progs:?}");
    assert!(progs.iter().all(|&p| offload::program_loaded(p)));
    t.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(t.wait_exit(DEADLINE).is_some(), "tether did not die");
    // Its program goes with its last descriptor: nothing is left that rewrites.
    let gone = wait_until(DEADLINE, || progs.iter().all(|&p| !offload::program_loaded(p)));
    assert!(gone, "programs {progs:?} still loaded after SIGKILL");
    // A datagram of the old flow now reaches nobody's rewrite: the old listener port is
    // closed, so it is simply not answered.
    assert!(udp_ask(&c, to, b"orphan", Duration::from_millis(300)).is_err());
    let t2 = offload_tether(133, &[&b], &[]);
    for i in 0..3 {
        echo(&c, t2.udp_addr(), format!("{i}").as_bytes());
    }
    wait_metric(&t2, "tether_udp_offloaded_datagrams_total", "", 5.0);
}

#[test]
fn maint_under_on_down_kill_takes_the_flow_out_of_the_kernel() {
    let (b0, b1) = (backend(134, 0), backend(134, 1));
    let t = offload_tether(134, &[&b0, &b1], &["--on-down", "kill"]);
    let (c, to) = (client(134, 0), t.udp_addr());
    let first = name_of(&c, to);
    for i in 0..4 {
        echo(&c, to, format!("{i}").as_bytes());
    }
    wait_metric(&t, "tether_udp_offloaded_datagrams_total", "", 9.0);
    let path = format!("/api/services/default/backends/{first}");
    let reply = http(t.admin(), "PUT", &path, r#"{"state":"maint"}"#).expect("PUT");
    assert_eq!(reply.status, 200, "{}", reply.body);
    // The flow ended and its entries went with it: the next datagram opens a flow elsewhere.
    let moved = wait_until(DEADLINE, || entries(&t) == 0);
    assert!(moved, "the entries outlived the flow");
    let other = name_of(&c, to);
    assert_ne!(other, first);
    assert_eq!(scrape(&t, "tether_flows_created_total", ""), 2.0);
}

#[test]
fn a_reload_that_denies_the_client_ends_its_offloaded_flow() {
    let b = backend(135, 0);
    let file = ConfigFile::new("offload-acl", "");
    let write = |deny: &str| {
        let text = format!(
            "udp-offload = \"on\"\nadmin = \"127.0.135.1:0\"\n[[service]]\nname = \"game\"\n\
             listen = [\"127.0.135.1:0\"]\nprotocol = \"udp\"\nhealth-check = \"off\"\n\
             deny = [{deny}]\n[[service.backend]]\naddress = \"{}\"\nname = \"u0\"\n",
            b.addr()
        );
        file.write(&text);
    };
    write("");
    let t = Tether::start(bin(), ["--config", file.path()]).expect("start tether");
    let (c, to) = (client(135, 0), t.udp_addr());
    for i in 0..4 {
        echo(&c, to, format!("{i}").as_bytes());
    }
    wait_metric(&t, "tether_udp_offloaded_datagrams_total", "", 7.0);
    write("\"127.0.135.50/32\"");
    let reply = http(t.admin(), "POST", "/api/reload", "").expect("POST /api/reload");
    assert_eq!(reply.status, 200, "{}", reply.body);
    // The flow is gone from the kernel and from tether: the client is not answered any more.
    assert!(wait_until(DEADLINE, || entries(&t) == 0), "the denied flow's entries stayed");
    assert!(udp_ask(&c, to, b"denied?", Duration::from_millis(500)).is_err());
    wait_metric(&t, "tether_datagrams_dropped_total", "reason=\"denied\"", 1.0);
}

#[test]
fn an_offloaded_flow_lives_while_the_kernel_carries_it_and_expires_once_idle() {
    let b = backend(136, 0);
    let t = offload_tether(136, &[&b], &["--udp-idle-timeout", "1s"]);
    let (c, to) = (client(136, 0), t.udp_addr());
    // Three idle timeouts of traffic that only the program sees.
    let start = std::time::Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(3) {
        echo(&c, to, format!("{i}").as_bytes());
        i += 1;
        std::thread::sleep(Duration::from_millis(100)); // pacing, not synchronisation
    }
    assert_eq!(scrape(&t, "tether_flows_expired_total", ""), 0.0, "a busy flow expired");
    assert_eq!(b.sources().len(), 1, "the flow was remade: {:?}", b.sources());
    assert_eq!(scrape(&t, "tether_backend_flows", "backend=\"u0\""), 1.0);
    // Silent: it expires, its gauge (what drain progress reads) comes back, and the entries go.
    wait_metric(&t, "tether_flows_expired_total", "", 1.0);
    assert_eq!(scrape(&t, "tether_backend_flows", "backend=\"u0\""), 0.0);
    assert_eq!(entries(&t), 0);
    wait_metric(&t, "tether_udp_offloaded_datagrams_total", "", 2.0 * i as f64 - 1.0);
    echo(&c, to, b"new flow");
    assert_eq!(b.sources().len(), 2, "a new flow, a new source port");
}

#[test]
fn a_backend_port_closed_under_an_offloaded_flow_moves_it_to_another() {
    let (mut b0, mut b1) = (backend(137, 0), backend(137, 1));
    let t = offload_tether(137, &[&b0, &b1], &[]);
    let (c, to) = (client(137, 0), t.udp_addr());
    let first = name_of(&c, to);
    for i in 0..4 {
        echo(&c, to, format!("{i}").as_bytes());
    }
    wait_metric(&t, "tether_udp_offloaded_datagrams_total", "", 9.0);
    // The port closes: the kernel's ICMP port unreachable about a rewritten datagram names
    // the flow's own socket (its source), which reports it as before: the flow ends there.
    if first == "u0" {
        b0.stop()
    } else {
        b1.stop()
    }
    let mut lost = 0;
    let moved =
        wait_until(DEADLINE, || match udp_ask(&c, to, b"name", Duration::from_millis(500)) {
            Ok((name, _)) => name != first.as_bytes(),
            Err(_) => {
                lost += 1;
                false
            }
        });
    assert!(moved, "the client never reached another backend");
    assert!(lost <= 2, "{lost} datagrams lost on the way");
    assert!(scrape(&t, "tether_backend_failures_total", &format!("backend=\"{first}\"")) >= 1.0);
}

#[test]
fn flows_that_need_a_proxy_header_on_every_datagram_stay_in_user_space() {
    let b = backend(138, 0);
    let every = ["--send-proxy", "v2", "--send-proxy-every-datagram"];
    let t = offload_tether(138, &[&b], &every);
    let c = client(138, 0);
    for _ in 0..5 {
        // The echo carries the header back: only that an answer comes matters here.
        udp_ask(&c, t.udp_addr(), b"x", REPLY).expect("an answer");
    }
    assert_eq!(scrape(&t, "tether_flows_offloaded_total", ""), 0.0);
    assert_eq!(scrape(&t, "tether_proxy_headers_sent_total", ""), 5.0);
    drop(t);
    // A header on the first datagram only: the flow goes to the kernel once it is sent.
    let t = offload_tether(138, &[&b], &["--send-proxy", "v2"]);
    for _ in 0..5 {
        udp_ask(&c, t.udp_addr(), b"x", REPLY).expect("an answer");
    }
    assert_eq!(scrape(&t, "tether_flows_offloaded_total", ""), 1.0);
    assert_eq!(scrape(&t, "tether_proxy_headers_sent_total", ""), 1.0);
    // The entries went in after the first datagram (it had to carry the header): its reply
    // came back by the program or by tether's socket, whichever was first.
    let mut last = 0.0;
    let carried = wait_until(DEADLINE, || {
        last = scrape(&t, "tether_udp_offloaded_datagrams_total", "");
        last == 8.0 || last == 9.0
    });
    assert!(carried, "the program carried {last} datagrams of 10");
}

#[test]
fn offload_on_without_the_privileges_fails_the_start_and_auto_says_why_it_is_off() {
    // Without CAP_BPF and CAP_NET_ADMIN (setpriv drops them from every set).
    let have_setpriv = std::process::Command::new("setpriv").arg("--version").output().is_ok();
    assert!(have_setpriv, "setpriv (util-linux) is needed");
    let b = backend(139, 0);
    let backend_arg = format!("{},name=u0", b.addr());
    let args = |mode: &str| {
        let mut a: Vec<String> = ["--inh-caps=-all", "--bounding-set=-bpf,-net_admin,-sys_admin"]
            .map(String::from)
            .to_vec();
        a.push(bin().to_str().unwrap().into());
        a.extend(
            ["--protocol", "udp", "--listen", "127.0.139.1:0", "--admin", "127.0.139.1:0"]
                .map(String::from),
        );
        a.extend(["--backend".into(), backend_arg.clone(), "--udp-offload".into(), mode.into()]);
        a.extend(["--health-check".into(), "off".into()]);
        a
    };
    let setpriv = std::path::Path::new("setpriv");
    let exit = run_to_exit(setpriv, args("on"), DEADLINE).expect("run tether");
    assert!(!exit.status.success());
    assert!(
        exit.stderr.contains("--udp-offload on: tether lacks CAP_NET_ADMIN"),
        "{}",
        exit.stderr
    );
    let t = Tether::start(setpriv, args("auto")).expect("auto starts without the offload");
    let s = status(&t);
    assert_eq!(s["udp_offload"]["enabled"], false);
    assert!(s["udp_offload"]["reason"].as_str().unwrap().contains("lacks"), "{s}");
    assert_eq!(scrape(&t, "tether_udp_offload_enabled", ""), 0.0);
    assert!(t.stderr_text().contains("udp offload off: tether lacks"), "{}", t.stderr_text());
    // And the flows work in user space.
    let c = client(139, 0);
    echo(&c, t.udp_addr(), b"still here");
}

/// Client host, tether host, backend host: three network namespaces joined by veth pairs,
/// tether on its own addresses (10.78.1.1 toward clients, 10.78.2.1 toward backends). An
/// offloaded flow goes from one interface to the other in the kernel (route looked up,
/// redirected), replies come back from the listener's address, and the receivers count no
/// checksum error, also for a datagram whose checksum the client computed in software.
#[test]
fn flows_between_interfaces_are_redirected_by_the_kernel_with_checksums_right() {
    use testkit::Namespace;
    let lb = Namespace::new().expect("a namespace (root)");
    let client_ns = Namespace::new().unwrap();
    let backend_ns = Namespace::new().unwrap();
    lb.sh(&format!(
        "ip link add c1 type veth peer name c0 netns {c}
         ip link add b1 type veth peer name b0 netns {b}
         ip addr add 10.78.1.1/24 dev c1; ip link set c1 up
         ip addr add 10.78.2.1/24 dev b1; ip link set b1 up",
        c = client_ns.tid,
        b = backend_ns.tid,
    ));
    // Software checksums from the senders (their offload off), so a wrong rewrite shows.
    client_ns
        .sh("ip addr add 10.78.1.2/24 dev c0; ip link set c0 up; ethtool -K c0 tx off >/dev/null");
    backend_ns
        .sh("ip addr add 10.78.2.2/24 dev b0; ip link set b0 up; ethtool -K b0 tx off >/dev/null");
    let b = backend_ns.run(|| UdpBackend::start("u0", "10.78.2.2:0".parse().unwrap()).unwrap());
    let t = lb.run(|| {
        let args = ["--protocol", "udp", "--udp-offload", "on", "--listen", "10.78.1.1:0"];
        let mut args: Vec<String> = args.map(String::from).to_vec();
        args.extend(["--admin".into(), "127.0.0.1:0".into()]);
        args.extend(["--backend".into(), format!("{},name=u0", b.addr())]);
        Tether::start(bin(), no_probes(&args)).expect("start tether in its namespace")
    });
    let to = t.udp_addr();
    let c = client_ns.run(|| UdpSocket::bind("10.78.1.2:0").unwrap());
    for i in 0..10 {
        echo(&c, to, format!("through {i}").as_bytes());
    }
    // A datagram with a checksum made in software, through a raw socket.
    let from = c.local_addr().unwrap();
    client_ns.run(|| testkit::inject_udp4(from, to, b"raw datagram", false));
    c.set_read_timeout(Some(REPLY)).unwrap();
    let mut buf = [0u8; 64];
    let (n, src) = c.recv_from(&mut buf).expect("the raw datagram's echo");
    assert_eq!((&buf[..n], src), (&b"raw datagram"[..], to));
    lb.run(|| {
        let s = status(&t);
        let interfaces = s["udp_offload"]["interfaces"].as_array().unwrap().clone();
        assert!(interfaces.contains(&"c1".into()) && interfaces.contains(&"b1".into()), "{s}");
        // All but the first of 22 went by the program, from c1 to b1 and back.
        wait_metric(&t, "tether_udp_offloaded_datagrams_total", "", 21.0);
    });
    assert_eq!(backend_ns.snmp("Udp", "InCsumErrors"), 0);
    assert_eq!(client_ns.snmp("Udp", "InCsumErrors"), 0);
    assert_eq!(lb.snmp("Udp", "InCsumErrors"), 0);
    // The host does not forward: only the program's redirect carried them.
    assert_eq!(
        lb.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap()).trim(),
        "0"
    );
}

#[test]
fn after_dropping_root_the_workers_still_offload() {
    let b = backend(129, 0);
    let t = offload_tether(129, &[&b], &["--user", "nobody"]);
    let (c, to) = (client(129, 0), t.udp_addr());
    for i in 0..3 {
        echo(&c, to, format!("{i}").as_bytes());
    }
    wait_metric(&t, "tether_udp_offloaded_datagrams_total", "", 5.0);
    assert!(t.stderr_text().contains("running as user nobody"), "{}", t.stderr_text());
}
