//! UDP flows through the real binary: replies from the listener address, stickiness shared with
//! TCP, idle expiry, sizes, the flow cap, failover, bad flags (issue 4).
//!
//! The file runs in both UDP modes: `TETHER_TEST_UDP_OFFLOAD=on` (established flows forwarded
//! by the kernel: needs root) and `off` (every datagram through tether's sockets);
//! scripts/test.sh runs it once each way. Unset, tether decides (`auto`).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

/// Time to wait for one reply: generous, the machine may be loaded.
const REPLY: Duration = Duration::from_secs(5);

fn udp_backends(net: u8, n: usize) -> Vec<UdpBackend> {
    (0..n)
        .map(|i| {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, net, 10 + i as u8));
            UdpBackend::start(&format!("u{i}"), SocketAddr::new(ip, 0)).expect("udp backend")
        })
        .collect()
}

fn udp_tether(listen: &str, backends: &[SocketAddr], extra: &[&str]) -> Tether {
    let mut args = vec!["--listen".to_string(), listen.to_string(), "--workers".into(), "2".into()];
    for (i, b) in backends.iter().enumerate() {
        args.extend(["--backend".to_string(), format!("{b},name=u{i}")]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    start(no_probes(&args))
}

/// Start tether with `args` in this run's UDP mode (`TETHER_TEST_UDP_OFFLOAD`).
fn start(mut args: Vec<String>) -> Tether {
    if let Ok(mode) = std::env::var("TETHER_TEST_UDP_OFFLOAD") {
        args.extend(["--udp-offload".to_string(), mode]);
    }
    Tether::start(bin(), &args).expect("start tether")
}

fn name_of(socket: &UdpSocket, to: SocketAddr) -> (String, SocketAddr) {
    let (reply, from) = udp_ask(socket, to, b"name", REPLY).expect("a reply");
    (String::from_utf8(reply).unwrap(), from)
}

#[test]
fn replies_come_from_the_address_the_client_sent_to_and_sources_stick() {
    let pool = udp_backends(50, 3);
    let addrs: Vec<_> = pool.iter().map(UdpBackend::addr).collect();
    // A wildcard listener: the reply's source comes from IP_PKTINFO.
    let t = udp_tether("0.0.0.0:0", &addrs, &["--protocol", "udp"]);
    let port = t.udp_addr().port();
    let mut owner: HashMap<u32, String> = HashMap::new();
    for round in 0..3 {
        for i in 0..60 {
            let socket = udp_client(client_ip(i)).unwrap();
            // Clients send to different local addresses of the same wildcard listener.
            let to =
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 50, 1 + (i % 3) as u8)), port);
            let (name, from) = name_of(&socket, to);
            assert_eq!(from, to, "reply came from {from}, client sent to {to}");
            let first = owner.entry(i).or_insert_with(|| name.clone());
            assert_eq!(&name, first, "source {} moved in round {round}", client_ip(i));
        }
    }
    let mut per: HashMap<&str, usize> = HashMap::new();
    for n in owner.values() {
        *per.entry(n).or_default() += 1;
    }
    assert_eq!(per.len(), 3, "60 sources all on {per:?}");
}

#[test]
fn tcp_and_udp_of_one_client_reach_the_same_backend() {
    // One backend host per name serving both TCP and UDP on one address each.
    let tcp = backends(51, 3);
    let udp: Vec<UdpBackend> = tcp
        .iter()
        .map(|b| {
            UdpBackend::start(b.name(), SocketAddr::new(b.addr().ip(), b.addr().port())).unwrap()
        })
        .collect();
    let mut args =
        vec!["--listen".to_string(), "127.0.51.1:0".into(), "--protocol".into(), "both".into()];
    args.extend(backend_args(&tcp));
    let t = start(no_probes(&args));
    assert_eq!(t.addr().port(), t.udp_addr().port());
    for i in 0..40 {
        // UDP first for half the clients, TCP first for the others: whichever comes first pins.
        let socket = udp_client(client_ip(i)).unwrap();
        let (by_udp, by_tcp) = if i % 2 == 0 {
            let u = name_of(&socket, t.udp_addr()).0;
            (u, ask_name(client_ip(i), t.addr()).unwrap())
        } else {
            let tc = ask_name(client_ip(i), t.addr()).unwrap();
            (name_of(&socket, t.udp_addr()).0, tc)
        };
        assert_eq!(by_udp, by_tcp, "client {} split across backends", client_ip(i));
    }
    drop(udp);
}

#[test]
fn datagram_sizes_round_trip_intact() {
    let pool = udp_backends(52, 1);
    let t = udp_tether("127.0.52.1:0", &[pool[0].addr()], &["--protocol", "udp"]);
    let socket = udp_client(client_ip(1)).unwrap();
    for size in [0usize, 1, 1472, 65_507] {
        let mut payload = vec![0u8; size];
        pattern(size as u64, &mut payload);
        if payload == b"name" {
            payload[0] ^= 1;
        }
        let (reply, from) = udp_ask(&socket, t.udp_addr(), &payload, REPLY).expect("echo");
        assert_eq!(from, t.udp_addr());
        assert_eq!(reply.len(), size);
        assert!(reply == payload, "{size}-byte datagram changed on the way");
    }
}

#[test]
fn idle_flows_expire_and_the_next_datagram_opens_a_new_one() {
    let pool = udp_backends(53, 1);
    let t = udp_tether(
        "127.0.53.1:0",
        &[pool[0].addr()],
        &["--protocol", "udp", "--udp-idle-timeout", "1s"],
    );
    let socket = udp_client(client_ip(1)).unwrap();
    // Traffic more often than the timeout keeps one flow (one source port at the backend).
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        udp_ask(&socket, t.udp_addr(), b"ping", REPLY).unwrap();
        std::thread::sleep(Duration::from_millis(50)); // traffic pacing
    }
    assert_eq!(pool[0].sources().len(), 1, "flow did not survive steady traffic");
    // Silence longer than the timeout ends it: the next datagram comes from a new port.
    let first = pool[0].sources();
    assert!(
        wait_until(DEADLINE, || {
            std::thread::sleep(Duration::from_millis(1200)); // let the flow go idle
            udp_ask(&socket, t.udp_addr(), b"ping", REPLY).is_ok() && pool[0].sources() != first
        }),
        "no new flow after the idle timeout"
    );
}

#[test]
fn a_flood_beyond_max_flows_is_dropped_and_established_flows_keep_working() {
    let pool = udp_backends(54, 1);
    let t = udp_tether(
        "127.0.54.1:0",
        &[pool[0].addr()],
        &[
            "--protocol",
            "udp",
            "--max-flows",
            "20",
            "--udp-idle-timeout",
            "1h",
            "--admin",
            "127.0.54.1:0",
        ],
    );
    let established: Vec<UdpSocket> = (0..10).map(|i| udp_client(client_ip(i)).unwrap()).collect();
    for s in &established {
        udp_ask(s, t.udp_addr(), b"ping", REPLY).expect("established flow");
    }
    let rss_before = t.rss_kib().unwrap();
    // 500 new sources: 10 more flows fit, the rest are dropped.
    let flood: Vec<UdpSocket> = (100..600).map(|i| udp_client(client_ip(i)).unwrap()).collect();
    for s in &flood {
        s.send_to(b"ping", t.udp_addr()).unwrap();
    }
    // UDP is lossy: under the flood the kernel may drop a ping before tether reads it (the
    // listener's buffer is full), so a client asks again, as a real one would.
    for s in &established {
        let served = wait_until(DEADLINE, || {
            udp_ask(s, t.udp_addr(), b"ping", Duration::from_secs(1)).is_ok()
        });
        assert!(served, "established flow no longer served");
    }
    let grew = t.rss_kib().unwrap().saturating_sub(rss_before);
    assert!(grew < 8 * 1024, "RSS grew by {grew} KiB under a 500-source flood");
    // Every flow has its own source port at the backend: at most 20 were ever made.
    let flows = pool[0].sources().len();
    assert!((11..=20).contains(&flows), "{flows} flows reached the backend with --max-flows 20");
    // The drops are counted, with their reason (never more than the refused sources sent; the
    // kernel may also have dropped some of the flood before tether read it).
    let dropped = || {
        let text = http(t.admin(), "GET", "/metrics", "").unwrap().body;
        text.lines()
            .find_map(|l| l.strip_prefix("tether_datagrams_dropped_total{reason=\"max_flows\"} "))
            .map_or(0, |v| v.parse::<u64>().unwrap())
    };
    let refused = 500 - (flows - 10) as u64;
    assert!(wait_until(DEADLINE, || dropped() > 0), "no drop counted");
    assert!(dropped() <= refused, "{} drops counted for {refused} refused sources", dropped());
}

#[test]
fn a_stopped_backends_flows_move_to_another() {
    let mut pool = udp_backends(55, 2);
    let addrs: Vec<_> = pool.iter().map(UdpBackend::addr).collect();
    let t = udp_tether("127.0.55.1:0", &addrs, &["--protocol", "udp"]);
    let sockets: Vec<UdpSocket> = (0..20).map(|i| udp_client(client_ip(i)).unwrap()).collect();
    let before: Vec<String> = sockets.iter().map(|s| name_of(s, t.udp_addr()).0).collect();
    let victim = before[0].clone();
    let v = pool.iter().position(|b| b.name() == victim).unwrap();
    pool[v].stop();
    for (i, s) in sockets.iter().enumerate() {
        // The first datagram after the stop may be lost (UDP); keep asking until answered.
        let mut answer = None;
        assert!(
            wait_until(DEADLINE, || {
                answer = udp_ask(s, t.udp_addr(), b"name", Duration::from_millis(200)).ok();
                answer.is_some()
            }),
            "source {} never answered after the stop",
            client_ip(i as u32)
        );
        let name = String::from_utf8(answer.unwrap().0).unwrap();
        if before[i] == victim {
            assert_ne!(name, victim);
        } else {
            assert_eq!(name, before[i], "a healthy backend's client moved");
        }
    }
}

#[test]
fn bad_udp_flags_are_refused() {
    let base = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"];
    for (extra, flag) in [
        (&["--protocol", "quic"][..], "--protocol"),
        (&["--udp-idle-timeout", "5"][..], "--udp-idle-timeout"),
        (&["--protocol", "udp", "--max-flows", "0"][..], "--max-flows"),
        (&["--protocol", "udp", "--max-flows", "999999999"][..], "--max-flows"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let exit = run_to_exit(bin(), &args, DEADLINE).unwrap();
        assert!(!exit.status.success(), "{args:?} accepted");
        assert_eq!(exit.stderr.lines().count(), 1, "{args:?}: {}", exit.stderr);
        assert!(exit.stderr.contains(flag), "{args:?}: {}", exit.stderr);
    }
}

#[test]
fn datagrams_from_anyone_but_the_backend_never_reach_the_client() {
    let pool = udp_backends(56, 1);
    let t = udp_tether("127.0.56.1:0", &[pool[0].addr()], &["--protocol", "udp"]);
    let client = udp_client(client_ip(1)).unwrap();
    assert_eq!(name_of(&client, t.udp_addr()).0, "u0");
    // The flow's backend socket, as the backend saw it.
    let flow_socket = pool[0].seen()[0];
    let rogue = UdpSocket::bind("127.0.56.99:0").unwrap();
    rogue.send_to(b"evil", flow_socket).unwrap();
    // The next reply the client gets is the backend's, not the rogue datagram.
    let (reply, _) = udp_ask(&client, t.udp_addr(), b"name", REPLY).unwrap();
    assert_eq!(reply, b"u0");
    client.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 64];
    assert!(client.recv_from(&mut buf).is_err(), "an extra datagram reached the client");
}

#[test]
fn a_closed_client_port_does_not_disturb_other_flows() {
    let pool = udp_backends(57, 1);
    let t = udp_tether("127.0.57.1:0", &[pool[0].addr()], &["--protocol", "udp"]);
    let steady = udp_client(client_ip(1)).unwrap();
    assert_eq!(name_of(&steady, t.udp_addr()).0, "u0");
    for i in 0..20 {
        // A client that sends and closes at once: the reply draws ICMP port unreachable.
        let gone = udp_client(client_ip(100 + i)).unwrap();
        gone.send_to(b"name", t.udp_addr()).unwrap();
        drop(gone);
        // The other client's flow is untouched: every one of its requests is answered.
        assert_eq!(name_of(&steady, t.udp_addr()).0, "u0", "round {i}");
    }
}

#[test]
fn five_tuple_affinity_pins_each_flow_on_its_own() {
    let pool = udp_backends(59, 3);
    let addrs: Vec<_> = pool.iter().map(UdpBackend::addr).collect();
    let t = udp_tether("127.0.59.1:0", &addrs, &["--protocol", "udp", "--affinity", "5tuple"]);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..30 {
        // One client IP, a new source port each time: a new flow each time.
        let socket = udp_client(client_ip(9)).unwrap();
        let (name, _) = name_of(&socket, t.udp_addr());
        // The flow itself stays put.
        assert_eq!(name_of(&socket, t.udp_addr()).0, name);
        seen.insert(name);
    }
    assert!(seen.len() >= 2, "30 flows of one client IP all went to {seen:?}");
}

#[test]
fn udp_probes_take_a_silent_backend_down_and_bring_it_back() {
    let mut pool = udp_backends(67, 2);
    let addrs: Vec<_> = pool.iter().map(UdpBackend::addr).collect();
    let mut args: Vec<String> = [
        "--protocol",
        "udp",
        "--admin",
        "127.0.67.1:0",
        "--health-send",
        "ping",
        "--health-expect",
        "pi",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "150ms",
    ]
    .map(String::from)
    .to_vec();
    args.extend(["--listen".into(), "127.0.67.1:0".into()]);
    for (i, b) in addrs.iter().enumerate() {
        args.extend(["--backend".to_string(), format!("{b},name=u{i}")]);
    }
    let t = start(args);
    let admin = t.admin();
    let health = |name: &str| api_backend(admin, name)["health"].as_str().unwrap().to_string();
    assert!(wait_until(DEADLINE, || !pool[0].sources().is_empty()), "u0 was never probed");
    assert_eq!(health("u0"), "up");
    pool[0].stop();
    assert!(wait_until(DEADLINE, || health("u0") == "down"), "a closed UDP port stayed up");
    assert_eq!(health("u1"), "up");
    // New flows avoid it.
    for i in 0..20 {
        let socket = udp_client(client_ip(i)).unwrap();
        assert_eq!(name_of(&socket, t.udp_addr()).0, "u1");
    }
    let back = UdpBackend::start("u0", addrs[0]).unwrap();
    assert!(wait_until(DEADLINE, || health("u0") == "up"), "never came back");
    drop(back);
}

/// Inodes of the sockets process `pid` holds (proc(5): /proc/PID/fd links read `socket:[N]`).
fn socket_inodes(pid: u32) -> std::collections::HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| {
                let link = std::fs::read_link(e.ok()?.path()).ok()?;
                let link = link.to_str()?;
                link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default()
}

/// The kernel's own count of datagrams dropped on the UDP sockets with these inodes: the last
/// column of /proc/net/udp and /proc/net/udp6 (`drops`, the socket's sk_drops).
fn kernel_drops(inodes: &std::collections::HashSet<u64>) -> u64 {
    let mut drops = 0;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 13 && f[9].parse().is_ok_and(|inode: u64| inodes.contains(&inode)) {
                drops += f[12].parse::<u64>().unwrap();
            }
        }
    }
    drops
}

/// Whether process `pid` is stopped (state `T` in /proc/PID/stat).
fn stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
}

/// Send `n` datagrams of 1,400 bytes to a one-worker tether while it is stopped (SIGSTOP), so
/// its listener's receive buffer overflows by the same amount every run, then resume it.
/// Returns the kernel's drop count for tether's sockets once tether's
/// `tether_datagrams_dropped_total{reason="kernel_rcvbuf"}` says the same, and tether's log.
fn flood_while_stopped(net: u8, n: usize, extra: &[&str]) -> (u64, String) {
    let backend = udp_backends(net, 1);
    let (listen, backend_addr) = (format!("127.0.{net}.1:0"), backend[0].addr().to_string());
    let mut args = vec!["--listen", &listen, "--admin", &listen, "--protocol", "udp"];
    args.extend(["--workers", "1", "--backend", &backend_addr]);
    // Socket buffers are what this measures: in both modes, the flood goes through them (an
    // offloaded flow's datagrams would pass beside the stopped process).
    args.extend(["--udp-offload", "off"]);
    args.extend_from_slice(extra);
    let mut t = Tether::start(bin(), no_probes(&args)).expect("start tether");
    let to = t.udp_addr();
    let client = udp_client(IpAddr::V4(Ipv4Addr::new(127, 0, net, 50))).unwrap();
    assert_eq!(name_of(&client, to).0, "u0");
    t.signal(nix::sys::signal::Signal::SIGSTOP).unwrap();
    assert!(wait_until(DEADLINE, || stopped(t.pid())), "tether never stopped");
    let payload = vec![7u8; 1400];
    for _ in 0..n {
        client.send_to(&payload, to).unwrap();
    }
    t.signal(nix::sys::signal::Signal::SIGCONT).unwrap();
    // Drops are reported with the next datagram each socket receives: ask until both sides
    // of the flow have had one and tether's count matches the kernel's.
    let mut last = (0, 0.0);
    let agreed = wait_until(DEADLINE, || {
        client.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        client.send_to(b"name", to).unwrap();
        let mut buf = vec![0u8; 2048];
        while let Ok(len) = client.recv(&mut buf) {
            if &buf[..len] == b"u0" {
                break;
            }
        }
        let kernel = kernel_drops(&socket_inodes(t.pid()));
        let counted = scrape(&t, "tether_datagrams_dropped_total", "reason=\"kernel_rcvbuf\"");
        last = (kernel, counted);
        kernel as f64 == counted
    });
    assert!(agreed, "kernel dropped {} datagrams, tether counted {}", last.0, last.1);
    (last.0, t.stderr_text())
}

#[test]
fn kernel_drops_are_counted_and_a_bigger_receive_buffer_lowers_them() {
    let n = 3000;
    let (default_drops, _) = flood_while_stopped(108, n, &[]);
    let (big_drops, log) = flood_while_stopped(109, n, &["--udp-rcvbuf", "4194304"]);
    eprintln!("{n} datagrams of 1400 B to a stopped tether: {default_drops} dropped with the default receive buffer, {big_drops} with --udp-rcvbuf 4194304");
    assert!(default_drops > 0, "the default buffer held {n} datagrams of 1400 B");
    // As root tether forces the size (SO_RCVBUFFORCE); otherwise net.core.rmem_max caps it,
    // and the log says what the kernel gave.
    let granted: Option<u64> = log
        .lines()
        .find_map(|l| l.split("udp-rcvbuf 4194304: the kernel gave ").nth(1))
        .and_then(|rest| rest.split(' ').next()?.parse().ok());
    let default: u64 = std::fs::read_to_string("/proc/sys/net/core/rmem_default")
        .map_or(212_992, |s| s.trim().parse().unwrap());
    match granted {
        Some(bytes) if bytes <= default => assert!(big_drops <= default_drops),
        _ => assert!(big_drops < default_drops, "{big_drops} >= {default_drops}"),
    }
}

#[test]
fn the_api_lists_each_flow_with_its_counts() {
    let pool = udp_backends(77, 1);
    let t = udp_tether(
        "127.0.77.1:0",
        &[pool[0].addr()],
        &["--protocol", "udp", "--admin", "127.0.77.1:0"],
    );
    let c = udp_client(IpAddr::V4(Ipv4Addr::new(127, 0, 77, 50))).unwrap();
    for i in 0..5 {
        let (reply, _) = udp_ask(&c, t.udp_addr(), format!("echo {i}").as_bytes(), REPLY).unwrap();
        assert_eq!(reply, format!("echo {i}").as_bytes());
    }
    let reply = http(t.admin(), "GET", "/api/flows", "").expect("GET /api/flows");
    let flows: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(flows.as_array().map(Vec::len), Some(1), "{flows}");
    let f = &flows[0];
    assert_eq!(f["client"], c.local_addr().unwrap().to_string());
    assert_eq!(f["listener"], t.udp_addr().to_string());
    assert_eq!((f["backend"].as_str(), f["service"].as_str()), (Some("u0"), Some("default")));
    // Exact whichever path carried them (with the offload on, read from the map when asked).
    assert_eq!((f["datagrams_in"].as_u64(), f["datagrams_out"].as_u64()), (Some(5), Some(5)));
    assert_eq!((f["bytes_in"].as_u64(), f["bytes_out"].as_u64()), (Some(30), Some(30)));
    // The backend's counters have them within a second, while the flow lives on.
    let label = "backend=\"u0\"";
    let counted = wait_until(DEADLINE, || {
        scrape(&t, "tether_backend_datagrams_in_total", label) == 5.0
            && scrape(&t, "tether_backend_datagram_bytes_out_total", label) == 30.0
    });
    assert!(counted, "{}", scrape(&t, "tether_backend_datagrams_in_total", label));
    let offloaded = std::env::var("TETHER_TEST_UDP_OFFLOAD").ok();
    if let Some(mode) = offloaded.as_deref().filter(|m| *m != "auto") {
        assert_eq!(f["offloaded"], mode == "on", "{f}");
    }
}
