//! The config file: `tether check`, starting from a file, and reloads (SIGHUP and the admin
//! endpoint) that keep every established session and the sticky table.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;

fn service(name: &str, listen: &str, backends: &[(&Backend, u32)]) -> String {
    let mut s = format!(
        "[[service]]\nname = \"{name}\"\nlisten = [\"{listen}\"]\nhealth-check = \"off\"\n"
    );
    for (b, w) in backends {
        s.push_str(&format!(
            "[[service.backend]]\naddress = \"{}\"\nname = \"{}\"\nweight = {w}\n",
            b.addr(),
            b.name()
        ));
    }
    s
}

#[test]
fn check_validates_without_starting_anything() {
    let pool = backends(70, 1);
    let good = ConfigFile::new("check-good", &service("pg", "127.0.70.1:0", &[(&pool[0], 1)]));
    let exit = run_to_exit(bin(), ["check", "--config", good.path()], DEADLINE).unwrap();
    assert_eq!(exit.status.code(), Some(0), "{}", exit.stderr);
    assert!(exit.stdout.starts_with("ok: 1 service (pg), 1 backend"), "{}", exit.stdout);
    let bad = ConfigFile::new(
        "check-bad",
        &service("pg", "127.0.70.1:0", &[(&pool[0], 1)]).replace("weight = 1", "weight = 0"),
    );
    let exit = run_to_exit(bin(), ["check", "--config", bad.path()], DEADLINE).unwrap();
    assert_eq!(exit.status.code(), Some(2));
    assert!(
        exit.stderr.contains("service[0].backend[0].weight \"0\": out of range"),
        "{}",
        exit.stderr
    );
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/tether.example.toml");
    let exit = run_to_exit(bin(), ["check", "--config", example], DEADLINE).unwrap();
    assert_eq!(exit.status.code(), Some(0), "{}", exit.stderr);
}

/// Several services from one file; a reload under traffic adds a backend, re-weights one,
/// removes one, adds a service, and keeps every established session and every pin.
#[test]
fn reload_under_traffic_keeps_sessions_and_pins() {
    let pool = backends(71, 4);
    let [b0, b1, b2, b3] = [&pool[0], &pool[1], &pool[2], &pool[3]];
    let admin_line = "admin = \"127.0.71.1:0\"\nworkers = 2\n";
    let first = format!(
        "{admin_line}{}{}",
        service("main", "127.0.71.1:0", &[(b0, 1), (b1, 1), (b2, 1)]),
        service("other", "127.0.71.2:0", &[(b3, 1)])
    );
    let file = ConfigFile::new("reload", &first);
    let first = first.replace(
        "name = \"other\"\nlisten = [\"127.0.71.2:0\"]\n",
        "name = \"other\"\nlisten = [\"127.0.71.2:0\"]\nprotocol = \"both\"\n",
    );
    file.write(&first);
    // `other` takes UDP too: a UDP backend named b3 beside the TCP one.
    let udp_b3 = UdpBackend::start("b3", b3.addr()).unwrap();
    let t = Tether::start(bin(), ["--config", file.path()]).unwrap();
    let (main, other) = (t.addrs()[0], t.addrs()[1]);
    assert_eq!(ask_name(client_ip(0), other).unwrap(), "b3");
    let flow = udp_client(client_ip(0)).unwrap();
    let udp_other = t.udp_addr();
    assert_eq!(udp_ask(&flow, udp_other, b"name", DEADLINE).unwrap().0, b"b3");
    let flow_port = udp_b3.seen().last().copied().unwrap();
    let sources: Vec<IpAddr> = (0..60).map(client_ip).collect();
    let before: Vec<String> = sources.iter().map(|&s| ask_name(s, main).unwrap()).collect();
    // Established sessions on every backend of `main`, b2 (to be removed) included.
    let mut open: Vec<_> = sources.iter().take(30).map(|&s| echo_session(s, main)).collect();
    for s in open.iter_mut() {
        echo_roundtrip(s, "before").unwrap();
    }
    let b4 = Backend::start("b4", "127.0.71.14:0".parse().unwrap()).unwrap();
    let second = format!(
        "{admin_line}{}{}{}",
        service("main", "127.0.71.1:0", &[(b0, 3), (b1, 1), (&b4, 1)]),
        service("other", "127.0.71.2:0", &[(b3, 1)]).replace(
            "listen = [\"127.0.71.2:0\"]\n",
            "listen = [\"127.0.71.2:0\"]\nprotocol = \"both\"\n"
        ),
        service("new", "127.0.71.3:0", &[(b3, 1)])
    );
    // The listen address of `main` is written as configured (port 0): it is the same listener.
    file.write(&second);
    // Continuous new sessions through the reload, from sources whose backends stay.
    let stay: Vec<IpAddr> =
        sources.iter().zip(&before).filter(|(_, b)| *b != "b2").map(|(s, _)| *s).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, stay) = (std::sync::Arc::clone(&stop), stay.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            for i in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match ask_name(stay[i % stay.len()], main) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    let mut t = t;
    t.signal(Signal::SIGHUP).unwrap();
    let admin = t.admin();
    assert!(
        wait_until(DEADLINE, || api_backends(admin).iter().any(|b| b["name"] == "b4")),
        "the reload never took effect: {}",
        t.stderr_text()
    );
    assert!(t.wait_stdout(|l| l.starts_with("listening tcp 127.0.71.3:"), DEADLINE));
    let new_addr: SocketAddr = t
        .stdout_lines()
        .iter()
        .find_map(|l| {
            l.strip_prefix("listening tcp 127.0.71.3:").map(|p| format!("127.0.71.3:{p}"))
        })
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ask_name(client_ip(1), new_addr).unwrap(), "b3", "the new service serves");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.join().unwrap();
    assert!(failed.is_empty(), "{} sessions failed across the reload: {failed:?}", failed.len());
    assert!(ok > 0);
    assert_eq!(api_backend(admin, "b0")["weight"], 3);
    assert!(!api_backends(admin).iter().any(|b| b["name"] == "b2"));
    // The UDP flow survived too: same flow socket toward the backend.
    assert_eq!(udp_ask(&flow, udp_other, b"name", DEADLINE).unwrap().0, b"b3");
    assert_eq!(udp_b3.seen().last().copied().unwrap(), flow_port, "the UDP flow was re-created");
    // Every established session survived, including those on the removed backend.
    for (i, s) in open.iter_mut().enumerate() {
        echo_roundtrip(s, "after").unwrap_or_else(|e| panic!("session {i} broke: {e}"));
    }
    // Pins kept: clients of backends still there stay; clients of the removed one move.
    for (i, &s) in sources.iter().enumerate() {
        let now = ask_name(s, main).unwrap();
        if before[i] == "b2" {
            assert_ne!(now, "b2");
        } else {
            assert_eq!(now, before[i], "source {i} moved by a reload");
        }
    }

    // A bad file is refused and the running configuration keeps serving.
    file.write("[[service]]\nname = \"main\"\nlisten = []\n");
    let reply = http(admin, "POST", "/api/reload", "").unwrap();
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body.contains("listen"), "{}", reply.body);
    assert!(t.wait_stderr(|l| l.contains("reload refused"), DEADLINE));
    t.signal(Signal::SIGHUP).unwrap();
    assert!(t.wait_stderr(|l| l.contains("SIGHUP: reload refused"), DEADLINE));
    assert_eq!(api_backends(admin).len(), 5);
    for (i, &s) in sources.iter().enumerate().filter(|(i, _)| before[*i] != "b2") {
        assert_eq!(ask_name(s, main).unwrap(), before[i]);
    }
    for s in open.iter_mut() {
        echo_roundtrip(s, "still").unwrap();
    }
    // And the admin endpoint reloads a good file.
    file.write(&first);
    let reply = http(admin, "POST", "/api/reload", "").unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(api_backends(admin).iter().any(|b| b["name"] == "b2"));
}

#[test]
fn reload_without_a_config_file_is_refused_and_harmless() {
    let pool = backends(72, 1);
    let t = tether_with_admin(72, &pool, &[]);
    let reply = http(t.admin(), "POST", "/api/reload", "").unwrap();
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("without --config"), "{}", reply.body);
    assert_eq!(ask_name(client_ip(0), t.addr()).unwrap(), "b0");
}

/// A port free on `ip` right now (bound by the kernel, then released).
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// Reloads that change a listener's protocol, move an address to another service, add UDP
/// when none ran, or deny a client with an open flow.
#[test]
fn reloads_that_change_protocols_and_owners_keep_the_right_sockets() {
    let pool = backends(73, 1);
    let udp_b0 = UdpBackend::start("b0", pool[0].addr()).unwrap();
    let port = free_port("127.0.73.1");
    let at = format!("127.0.73.1:{port}");
    let with = |name: &str, protocol: &str, extra: &str| {
        format!(
            "admin = \"127.0.73.1:0\"\nworkers = 2\n{}",
            service(name, &at, &[(&pool[0], 1)]).replace(
                "health-check = \"off\"\n",
                &format!("health-check = \"off\"\nprotocol = \"{protocol}\"\n{extra}"),
            )
        )
    };
    let file = ConfigFile::new("protocols", &with("a", "both", ""));
    let mut t = Tether::start(bin(), ["--config", file.path()]).unwrap();
    let admin = t.admin();
    let addr: SocketAddr = at.parse().unwrap();
    let flow = udp_client(client_ip(0)).unwrap();
    assert_eq!(udp_ask(&flow, addr, b"name", DEADLINE).unwrap().0, b"b0");
    assert_eq!(ask_name(client_ip(0), addr).unwrap(), "b0");
    let reload = |text: &str| {
        file.write(text);
        http(admin, "POST", "/api/reload", "").unwrap()
    };

    // The flow's client is denied by a reload: its next datagram is dropped, the flow ends.
    let r = reload(&with("a", "both", "deny = [\"127.1.0.1/32\"]\n"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(udp_ask(&flow, addr, b"name", Duration::from_millis(300)).is_err());
    let other = udp_client(client_ip(1)).unwrap();
    assert_eq!(udp_ask(&other, addr, b"name", DEADLINE).unwrap().0, b"b0");

    // both -> tcp: the UDP socket closes, the TCP listener on the same address stays.
    let r = reload(&with("a", "tcp", ""));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ask_name(client_ip(2), addr).unwrap(), "b0");
    assert!(udp_ask(&other, addr, b"name", Duration::from_millis(300)).is_err());

    // The address moves to a service of another name: the new service's socket serves it.
    let r = reload(&with("b", "tcp", ""));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(t.wait_stdout(|l| l == format!("listening tcp {at}").as_str(), DEADLINE));
    // Until both workers have let the old socket go, a client the kernel hashes to it in the
    // instant between a worker taking its queue and closing it would be reset (F11).
    let closed = format!("closed listener {at}");
    assert!(wait_until(DEADLINE, || t.stderr_text().matches(&closed).count() == 2));
    for i in 3..10 {
        assert_eq!(ask_name(client_ip(i), addr).unwrap(), "b0", "client {i} after the move");
    }
    let names: Vec<_> = api_backends(admin).iter().map(|b| b["service"].clone()).collect();
    assert_eq!(names, vec!["b"]);
    t.signal(Signal::SIGTERM).unwrap();
    assert!(t.wait_exit(DEADLINE).is_some());
    drop(udp_b0);
}

#[test]
fn a_reload_cannot_add_the_first_udp_service() {
    let pool = backends(74, 1);
    let tcp_only =
        format!("admin = \"127.0.74.1:0\"\n{}", service("a", "127.0.74.1:0", &[(&pool[0], 1)]));
    let file = ConfigFile::new("first-udp", &tcp_only);
    let t = Tether::start(bin(), ["--config", file.path()]).unwrap();
    file.write(
        &tcp_only
            .replace("health-check = \"off\"\n", "health-check = \"off\"\nprotocol = \"both\"\n"),
    );
    let r = http(t.admin(), "POST", "/api/reload", "").unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("restart tether to add the first UDP service"), "{}", r.body);
    assert_eq!(ask_name(client_ip(0), t.addr()).unwrap(), "b0");
}

#[test]
fn connect_from_addresses_are_checked_at_start_and_on_reload() {
    let pool = backends(76, 1);
    // An address that is not this host's stops the start, naming it.
    let exit = run_to_exit(
        bin(),
        no_probes(&[
            "--listen".into(),
            "127.0.76.1:0".into(),
            "--backend".into(),
            pool[0].addr().to_string(),
            "--connect-from".into(),
            "192.0.2.1".into(),
        ]),
        DEADLINE,
    )
    .unwrap();
    assert_eq!(exit.status.code(), Some(1), "{}", exit.stderr);
    assert!(
        exit.stderr
            .contains("connect-from 192.0.2.1 (service \"default\"): not an address of this host"),
        "{}",
        exit.stderr
    );
    // Sessions come from the configured address; a reload changes it.
    let with_source = |ip: &str| {
        format!(
            "admin = \"127.0.76.1:0\"\n{}",
            service("s", "127.0.76.1:0", &[(&pool[0], 1)])
                .replace("health-check", &format!("connect-from = [\"{ip}\"]\nhealth-check"))
        )
    };
    let file = ConfigFile::new("connect-from", &with_source("127.0.76.20"));
    let t = Tether::start(bin(), ["--config", file.path()]).unwrap();
    let peer_of_next_session = |client: u32| {
        let before = pool[0].log().len();
        assert_eq!(ask_name(client_ip(client), t.addr()).unwrap(), "b0");
        assert!(pool[0].wait_for(|log| log.len() > before, DEADLINE));
        pool[0].log()[before].peer.ip().to_string()
    };
    assert_eq!(peer_of_next_session(0), "127.0.76.20");
    file.write(&with_source("127.0.76.21"));
    let r = http(t.admin(), "POST", "/api/reload", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(peer_of_next_session(1), "127.0.76.21");
    // A reload naming a foreign address is refused whole; the old address stays in use.
    file.write(&with_source("192.0.2.1"));
    let r = http(t.admin(), "POST", "/api/reload", "").unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("connect-from 192.0.2.1"), "{}", r.body);
    assert_eq!(peer_of_next_session(2), "127.0.76.21");
    // A backend the API adds must be reachable from a connect-from address too.
    let r =
        http(t.admin(), "POST", "/api/services/s/backends", r#"{"address":"[::1]:9"}"#).unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("none is of [::1]:9's family"), "{}", r.body);
}

/// F11: a listener a reload removes takes the clients already queued on it before it closes.
/// The worker is held still while the reload is asked for and clients queue up behind it, so
/// it reads the reload's command before it sees them.
#[test]
fn a_reload_serves_the_clients_queued_on_a_listener_it_closes() {
    let pool = backends(37, 1);
    let (gone, kept) = (free_port("127.0.37.1"), free_port("127.0.37.2"));
    let text = |listen: &str| {
        format!(
            "admin = \"127.0.37.1:0\"\nworkers = 1\n{}",
            service("s", "127.0.37.2:0", &[(&pool[0], 1)])
                .replace("listen = [\"127.0.37.2:0\"]", &format!("listen = [{listen}]"))
        )
    };
    let both = format!("\"127.0.37.1:{gone}\", \"127.0.37.2:{kept}\"");
    let file = ConfigFile::new("queued", &text(&both));
    let t = Tether::start(bin(), ["--config", file.path()]).unwrap();
    let gone: SocketAddr = format!("127.0.37.1:{gone}").parse().unwrap();
    assert_eq!(ask_name(client_ip(0), gone).unwrap(), "b0");

    let frozen = FrozenThread::freeze(t.pid(), "tether-w0").expect("stop the worker");
    file.write(&text(&format!("\"127.0.37.2:{kept}\"")));
    let r = http(t.admin(), "POST", "/api/reload", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let queued: Vec<_> = (1..4)
        .map(|i| {
            let mut s = connect_from(client_ip(i), gone, DEADLINE).unwrap();
            send_command(&mut s, "name").unwrap();
            s
        })
        .collect();
    drop(frozen);
    for (i, mut s) in queued.into_iter().enumerate() {
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut s, &mut reply)
            .unwrap_or_else(|e| panic!("queued client {i}: {e}"));
        assert_eq!(reply, "b0\n", "queued client {i}");
    }
    let closed = format!("closed listener {gone} (3 queued clients taken first)");
    assert!(t.wait_stderr(|l| l.contains(&closed), DEADLINE), "{}", t.stderr_text());
    assert!(connect_from(client_ip(9), gone, DEADLINE).is_err(), "the listener is still open");
}

/// The receive buffer the kernel holds for the UDP socket bound to `addr` (`rb` of
/// `ss -uamn`, sock_diag's SK_MEMINFO_RCVBUF: twice what was asked, socket(7)).
fn udp_rcvbuf(addr: SocketAddr) -> Option<u64> {
    let out = std::process::Command::new("ss")
        .args(["-uamnH", "src", &addr.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("rb")? + 2;
    text[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// `udp-rcvbuf` reaches the listener at start and again on a reload (sizes under the default
/// net.core.rmem_max, so root or not the kernel grants them).
#[test]
fn a_reload_gives_kept_udp_listeners_their_new_buffer_size() {
    let pool = backends(38, 1);
    let text = |bytes: u32| {
        format!(
            "admin = \"127.0.38.1:0\"\nworkers = 1\n{}",
            service("u", "127.0.38.2:0", &[(&pool[0], 1)])
        )
        .replace(
            "health-check = \"off\"\n",
            &format!("health-check = \"off\"\nprotocol = \"udp\"\nudp-rcvbuf = {bytes}\n"),
        )
    };
    let file = ConfigFile::new("rcvbuf", &text(65_536));
    let t = Tether::start(bin(), ["--config", file.path()]).unwrap();
    let listener = t.udp_addr();
    assert_eq!(udp_rcvbuf(listener), Some(2 * 65_536));
    file.write(&text(100_000));
    let r = http(t.admin(), "POST", "/api/reload", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // The worker applies it when it takes the new snapshot.
    let mut seen = None;
    let applied = wait_until(DEADLINE, || {
        seen = udp_rcvbuf(listener);
        seen == Some(2 * 100_000)
    });
    assert!(applied, "the listener's buffer is {seen:?} after the reload");
}

/// A reload asked for while the process stops (SIGTERM, a session still open) is refused with
/// 503: its listeners are closing, and the reload would bind new ones no worker serves.
#[test]
fn a_reload_while_stopping_is_refused() {
    let pool = backends(149, 1);
    let admin = format!("127.0.149.1:{}", free_port("127.0.149.1"));
    let text = format!("admin = \"{admin}\"\ngrace = \"1h\"\n\n")
        + &service("db", "127.0.149.1:0", &[(&pool[0], 1)]);
    let file = ConfigFile::new("stopping", &text);
    let mut t = Tether::start(bin(), ["--config", file.path()]).unwrap();
    let mut open = echo_session(client_ip(1), t.addr());
    t.signal(Signal::SIGTERM).unwrap();
    assert!(t.wait_stderr(|l| l.contains("closing listeners"), DEADLINE));
    let reply = http(t.admin(), "POST", "/api/reload", "").unwrap();
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("stopping"), "{}", reply.body);
    // The open session is untouched.
    echo_roundtrip(&mut open, "still").unwrap();
}
