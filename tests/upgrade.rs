//! In-place upgrade (issue 12): SIGUSR2 or `POST /api/upgrade` starts the binary at tether's
//! path again and hands it the listeners, the admin listener, the pins and the backends'
//! states; the old process serves its open sessions and exits.

mod common;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A copy of the binary in a directory of the test's own (so it can be replaced, as a deploy
/// does), removed when dropped.
struct Install(PathBuf);

impl Install {
    fn new(tag: &str) -> Install {
        let dir = std::env::temp_dir().join(format!("tether-upgrade-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let install = Install(dir);
        install.deploy(std::fs::read(bin()).unwrap());
        install
    }

    fn exe(&self) -> PathBuf {
        self.0.join("tether")
    }

    /// Put a new file at the binary's path (write beside it, then rename, as package managers do).
    fn deploy(&self, bytes: Vec<u8>) {
        use std::os::unix::fs::PermissionsExt;
        let next = self.0.join("tether.next");
        std::fs::write(&next, bytes).unwrap();
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&next, self.exe()).unwrap();
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A second build of tether, with another version string (`TETHER_BUILD_ID=rebuilt`), as a
/// deploy brings: built into target/rebuilt (scripts/test.sh builds it before the tests; here
/// the build is then a no-op).
fn rebuilt() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            let dir = root.join("target").join("rebuilt");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .current_dir(&root)
                .args(["build", "-q", "-p", "tether", "--bin", "tether"])
                .env("CARGO_TARGET_DIR", &dir)
                .env("TETHER_BUILD_ID", "rebuilt")
                .status()
                .expect("running cargo build");
            assert!(status.success(), "building the second tether: {status}");
            dir.join("debug").join("tether")
        })
        .clone()
}

fn status_version(t: &Tether) -> Option<String> {
    let body = http(t.admin(), "GET", "/api/status", "").ok()?.body;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    status["version"].as_str().map(str::to_string)
}

/// The process that an upgrade of `old` started, once it answers the admin address.
fn successor_of(t: &Tether, old: u32) -> Successor {
    let mut new = None;
    assert!(wait_until(DEADLINE, || {
        new = status_pid(t).filter(|&p| p != old);
        new.is_some()
    }));
    Successor(new)
}

fn start(install: &Install, net: u8, pool: &[Backend], extra: &[&str]) -> Tether {
    let mut args = vec![
        "--listen".to_string(),
        format!("127.0.{net}.1:0"),
        "--admin".into(),
        format!("127.0.{net}.1:0"),
        "--workers".into(),
        "2".into(),
    ];
    args.extend(backend_args(pool));
    args.extend(extra.iter().map(|s| s.to_string()));
    Tether::start(&install.exe(), no_probes(&args)).expect("start tether")
}

fn status_pid(t: &Tether) -> Option<u32> {
    let body = http(t.admin(), "GET", "/api/status", "").ok()?.body;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    status["pid"].as_u64().map(|p| p as u32)
}

fn put_state(t: &Tether, backend: &str, state: &str) {
    let path = format!("/api/services/default/backends/{backend}");
    let r = http(t.admin(), "PUT", &path, &format!(r#"{{"state":"{state}"}}"#)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Pin `clients`, moving b0's to other backends (maint, then ready again): where each is now.
fn pin_and_move(t: &Tether, clients: &[IpAddr]) -> Vec<String> {
    for &ip in clients {
        ask_name(ip, t.addr()).unwrap();
    }
    put_state(t, "b0", "maint");
    let now: Vec<String> = clients.iter().map(|&ip| ask_name(ip, t.addr()).unwrap()).collect();
    put_state(t, "b0", "ready");
    now
}

/// UDP clients, each sending a numbered datagram every 20 ms from its own address until
/// stopped, and counting the echoes.
struct UdpLoad {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl UdpLoad {
    fn start(to: std::net::SocketAddr, clients: Vec<IpAddr>) -> UdpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Vec<_> = clients
            .iter()
            .map(|&ip| {
                let s = udp_client(ip).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut sent, mut got) = (0u64, 0u64);
                let mut buf = [0u8; 64];
                let mut drain = |got: &mut u64| {
                    for s in &sockets {
                        while s.recv(&mut buf).is_ok() {
                            *got += 1;
                        }
                    }
                };
                let started = std::time::Instant::now();
                while !stop.load(Relaxed) && started.elapsed() < Duration::from_secs(60) {
                    for s in &sockets {
                        if s.send_to(format!("{sent}").as_bytes(), to).is_ok() {
                            sent += 1;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20)); // pacing, not synchronisation
                    drain(&mut got);
                }
                // The last echoes: until all are in or 5 s have passed.
                wait_until(Duration::from_secs(5), || {
                    drain(&mut got);
                    got >= sent
                });
                (sent, got)
            })
        };
        UdpLoad { stop, thread: Some(thread) }
    }

    /// Datagrams sent and echoes received.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Relaxed);
        self.thread.take().map(|t| t.join().unwrap()).unwrap_or_default()
    }
}

impl Drop for UdpLoad {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn an_upgrade_under_traffic_refuses_nobody_keeps_every_pin_open_session_and_flow() {
    let pool = backends(115, 3);
    // A UDP backend of the same name on each TCP backend's address.
    let udp_pool: Vec<UdpBackend> =
        pool.iter().map(|b| UdpBackend::start(b.name(), b.addr()).unwrap()).collect();
    let install = Install::new("load");
    let mut t = start(&install, 115, &pool, &["--protocol", "both"]);
    let old = t.pid();
    let clients: Vec<IpAddr> = (0..100).map(client_ip).collect();
    let before = pin_and_move(&t, &clients);
    let mut open: Vec<_> = (200..250).map(|i| echo_session(client_ip(i), t.addr())).collect();
    // 20 UDP flows, a datagram every 20 ms each, through the upgrade.
    let flows = UdpLoad::start(t.udp_addr(), (300..320).map(client_ip).collect());
    assert!(wait_until(DEADLINE, || {
        udp_pool.iter().map(|u| u.sources().len()).sum::<usize>() == 20
    }));
    // New connections all along, from their own addresses.
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let addr = t.addr();
    let load = {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut i = 1000;
            while !stop.load(Relaxed) && started.elapsed() < Duration::from_secs(60) {
                match ask_name(client_ip(i % 20_000), addr) {
                    Ok(_) => ok.fetch_add(1, Relaxed),
                    Err(_) => failed.fetch_add(1, Relaxed),
                };
                i += 1;
            }
            started.elapsed()
        })
    };
    assert!(wait_until(DEADLINE, || ok.load(Relaxed) > 20));
    // An admin state set before goes along (b2 takes no new clients, keeps its pinned ones).
    put_state(&t, "b2", "drain");
    let old_version = status_version(&t).unwrap();
    assert!(!old_version.contains("rebuilt"), "{old_version}");
    install.deploy(std::fs::read(rebuilt()).unwrap());
    t.signal(Signal::SIGUSR2).unwrap();
    let successor = successor_of(&t, old);
    let new = successor.0;
    // The new build answers, and says so in its log.
    // The old process answers the admin requests it had already accepted when the new one
    // became ready, then accepts no more: ask until the new build answers.
    let mut new_version = String::new();
    let answered = wait_until(DEADLINE, || {
        new_version = status_version(&t).unwrap_or_default();
        new_version.ends_with("(rebuilt)")
    });
    assert!(answered, "{new_version}");
    assert_eq!(api_backend(t.admin(), "b2")["state"], "drain");
    let pid = new.unwrap_or_default();
    assert!(
        t.wait_stderr(|l| l.contains(&format!("tether {new_version} (pid {pid})")), DEADLINE),
        "{}",
        t.stderr_text()
    );
    let served = ok.load(Relaxed);
    assert!(wait_until(DEADLINE, || ok.load(Relaxed) > served + 50), "no client served after");
    stop.store(true, Relaxed);
    let lasted = load.join().unwrap();
    eprintln!(
        "new connections: {} in {lasted:?} ({:.0}/s)",
        ok.load(Relaxed),
        ok.load(Relaxed) as f64 / lasted.as_secs_f64()
    );
    assert_eq!(
        failed.load(Relaxed),
        0,
        "{} connections failed across the upgrade",
        failed.load(Relaxed)
    );
    // Every flow went on with its backend and its source port toward it: the backends saw
    // no source but the 20 of before.
    let (sent, echoed) = flows.finish();
    let sources: Vec<_> = udp_pool.iter().flat_map(|u| u.sources()).collect();
    assert_eq!(sources.len(), 20, "a flow changed backend or source port: {sources:?}");
    // None lost but what the kernel dropped on full socket buffers (counted on the sockets,
    // which the new process now reads).
    let kernel = scrape(&t, "tether_datagrams_dropped_total", "reason=\"kernel_rcvbuf\"");
    eprintln!("udp across the upgrade: {sent} sent, {echoed} echoed, kernel drops {kernel}");
    assert!(
        sent.saturating_sub(echoed) as f64 <= kernel,
        "{} of {sent} datagrams lost, the kernel dropped {kernel}",
        sent.saturating_sub(echoed)
    );
    // Every pin came along, moved ones included.
    for (ip, want) in clients.iter().zip(&before) {
        assert_eq!(&ask_name(*ip, t.addr()).unwrap(), want, "client {ip}");
    }
    // The old process serves its open sessions, then exits once they end.
    for s in open.iter_mut() {
        echo_roundtrip(s, "still here").unwrap();
    }
    assert!(
        t.wait_stderr(|l| l.contains("SIGUSR2: upgraded: pid"), DEADLINE),
        "{}",
        t.stderr_text()
    );
    drop(open);
    let status = t.wait_exit(DEADLINE).expect("the old process exits once its sessions end");
    assert!(status.success(), "{status}");
}

#[test]
fn a_failing_upgrade_leaves_the_old_process_serving_and_a_second_one_works() {
    let pool = backends(116, 2);
    let udp_pool: Vec<UdpBackend> =
        pool.iter().map(|b| UdpBackend::start(b.name(), b.addr()).unwrap()).collect();
    let install = Install::new("fail");
    let t = start(&install, 116, &pool, &["--protocol", "both"]);
    let old = t.pid();
    let clients: Vec<IpAddr> = (0..30).map(client_ip).collect();
    let before = pin_and_move(&t, &clients);
    let flow = udp_client(client_ip(400)).unwrap();
    let echo = |payload: &[u8]| udp_ask(&flow, t.udp_addr(), payload, DEADLINE).map(|r| r.0);
    assert_eq!(echo(b"one").unwrap(), b"one");
    // A broken binary: it exits at once.
    install.deploy(b"#!/bin/sh\nexit 3\n".to_vec());
    let r = http(t.admin(), "POST", "/api/upgrade", "").unwrap();
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(r.body.contains("exited before"), "{}", r.body);
    assert_eq!(status_pid(&t), Some(old));
    // The UDP flow was paused for the hand-over and runs on in the old process, same socket.
    assert_eq!(echo(b"two").unwrap(), b"two");
    let sources: Vec<_> = udp_pool.iter().flat_map(|u| u.sources()).collect();
    assert_eq!(sources.len(), 1, "{sources:?}");
    for (ip, want) in clients.iter().zip(&before) {
        assert_eq!(&ask_name(*ip, t.addr()).unwrap(), want, "client {ip}");
    }
    // The real binary again: the upgrade goes through, and the old process, still serving an
    // open session, refuses another.
    let mut open = echo_session(client_ip(500), t.addr());
    install.deploy(std::fs::read(bin()).unwrap());
    let r = http(t.admin(), "POST", "/api/upgrade", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // The old admin server stops once it has answered: the new process answers from then on.
    let _successor = successor_of(&t, old);
    let mut old_process = t;
    old_process.signal(Signal::SIGUSR2).unwrap();
    assert!(
        old_process
            .wait_stderr(|l| l.contains("upgrade refused") && l.contains("already"), DEADLINE),
        "{}",
        old_process.stderr_text()
    );
    for (ip, want) in clients.iter().zip(&before) {
        assert_eq!(&ask_name(*ip, old_process.addr()).unwrap(), want, "client {ip}");
    }
    echo_roundtrip(&mut open, "served by the old process").unwrap();
    drop(open);
    assert!(old_process.wait_exit(DEADLINE).is_some_and(|s| s.success()));
}

#[test]
fn an_upgrade_with_a_bad_configuration_is_refused_and_nothing_changes() {
    let pool = backends(117, 1);
    let install = Install::new("badconf");
    let text = format!(
        "admin = \"127.0.117.1:0\"\n[[service]]\nname = \"s\"\nlisten = [\"127.0.117.1:0\"]\nhealth-check = \"off\"\n[[service.backend]]\naddress = \"{}\"\nname = \"b0\"\n",
        pool[0].addr()
    );
    let file = ConfigFile::new("upgrade-badconf", &text);
    let t = Tether::start(&install.exe(), ["--config", file.path()]).unwrap();
    file.write(&text.replace("name = \"b0\"", "weight = 0"));
    let r = http(t.admin(), "POST", "/api/upgrade", "").unwrap();
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(status_pid(&t), Some(t.pid()));
    assert_eq!(ask_name(client_ip(1), t.addr()).unwrap(), "b0");
}

#[test]
fn after_an_upgrade_the_old_process_cuts_its_sessions_at_the_upgrade_grace_not_the_grace() {
    let pool = backends(118, 1);
    let install = Install::new("grace");
    let mut t = start(&install, 118, &pool, &["--grace", "1h", "--upgrade-grace", "1s"]);
    let old = t.pid();
    let mut open = echo_session(client_ip(1), t.addr());
    echo_roundtrip(&mut open, "before").unwrap();
    let r = http(t.admin(), "POST", "/api/upgrade", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let successor = successor_of(&t, old);
    let new = successor.0;
    // The session never ends by itself: only the 1 s upgrade grace (not the hour) ends it.
    let status = t.wait_exit(DEADLINE).expect("the old process exits at the upgrade grace");
    assert!(status.success(), "{status}");
    assert!(echo_roundtrip(&mut open, "after").is_err(), "the old process's session was cut");
    // The new process serves, and upgrades in its turn (two in a row).
    assert_eq!(ask_name(client_ip(2), t.addr()).unwrap(), "b0");
    let r = http(t.admin(), "POST", "/api/upgrade", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let _third = successor_of(&t, new.unwrap_or_default());
    assert_eq!(ask_name(client_ip(2), t.addr()).unwrap(), "b0");
}

#[test]
fn a_second_upgrade_asked_while_one_runs_is_refused() {
    let pool = backends(119, 1);
    let install = Install::new("concurrent");
    let mut t = start(&install, 119, &pool, &[]);
    let old = t.pid();
    // An open session keeps the old process alive after it hands over.
    let mut open = echo_session(client_ip(1), t.addr());
    // A new binary that takes a while to start (a slow disk, a big binary).
    let real = install.0.join("tether.real");
    std::fs::copy(bin(), &real).unwrap();
    install.deploy(format!("#!/bin/sh\nsleep 2\nexec {} \"$@\"\n", real.display()).into_bytes());
    let admin = t.admin();
    let first = std::thread::spawn(move || http(admin, "POST", "/api/upgrade", "").unwrap());
    // The first has begun (its new process is starting) when the second is asked.
    assert!(wait_until(DEADLINE, || {
        std::fs::read_to_string(format!("/proc/{old}/task/{old}/children"))
            .is_ok_and(|c| !c.trim().is_empty())
    }));
    t.signal(Signal::SIGUSR2).unwrap();
    let r = first.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let _successor = successor_of(&t, old);
    assert!(
        t.wait_stderr(
            |l| l.contains("SIGUSR2: upgrade refused") && l.contains("already"),
            DEADLINE
        ),
        "{}",
        t.stderr_text()
    );
    // One new process, not two.
    let children = std::fs::read_to_string(format!("/proc/{old}/task/{old}/children"));
    assert_eq!(children.unwrap_or_default().split_whitespace().count(), 1);
    echo_roundtrip(&mut open, "served by the old process").unwrap();
}

/// The old process still serves a session (a long upgrade grace) when the new one is stopped:
/// the listening socket and the admin listener must close with the process that serves them.
/// The old process kept descriptors of both for upgrades, so they went on listening: clients
/// were accepted by the kernel and hung, and a tether started again on the port shared its
/// clients with that dead socket (SO_REUSEPORT). Found by the chaos suite (issue 15).
#[test]
fn after_an_upgrade_stopping_the_new_process_closes_the_listeners_the_old_one_still_runs() {
    let pool = backends(148, 1);
    let install = Install::new("close");
    let mut t = start(&install, 148, &pool, &["--upgrade-grace", "1h"]);
    let (listen, admin, old) = (t.addr(), t.admin(), t.pid());
    let mut open = echo_session(client_ip(1), listen);
    echo_roundtrip(&mut open, "before").unwrap();
    let r = http(admin, "POST", "/api/upgrade", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let mut successor = successor_of(&t, old);
    let pid = nix::unistd::Pid::from_raw(successor.0.take().expect("a new pid") as i32);
    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
    let gone = wait_until(DEADLINE, || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"))
    });
    assert!(gone, "the new process did not exit");
    // The old process is still there, serving its session...
    assert!(t.wait_exit(Duration::from_millis(200)).is_none());
    echo_roundtrip(&mut open, "during").unwrap();
    // ...and holds neither listener.
    let refused = |to| {
        connect_from(client_ip(2), to, Duration::from_secs(2))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    assert!(refused(listen), "the listener still accepts with no process serving it");
    assert!(refused(admin), "the admin listener still accepts with no process serving it");
}
