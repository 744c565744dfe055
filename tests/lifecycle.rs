//! Flags, limits, timeouts and shutdown: what an operator sees from outside.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use common::*;

fn run(args: &[&str]) -> Exit {
    run_to_exit(bin(), args, DEADLINE).expect("run tether")
}

#[test]
fn bad_flags_exit_non_zero_with_one_line_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.40.1:0").unwrap();
    let in_use = taken.local_addr().unwrap().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--listen", "127.0.0.1:notaport", "--backend", "127.0.0.1:1"], "--listen"),
        (&["--listen", "127.0.0.1:0"], "--backend"),
        (&["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1,weight=0"], "--backend"),
        (&["--listen", "127.0.0.1:0", "--backend", "bad:1"], "--backend"),
        (
            &["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", "--affinity", "cookie"],
            "--affinity",
        ),
        (
            &["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", "--idle-timeout", "5"],
            "--idle-timeout",
        ),
        (&["--listen", &in_use, "--backend", "127.0.0.1:1"], "--listen"),
        (&["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", "--bogus"], "--bogus"),
        (
            &["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", "--max-conns", "999999999"],
            "--max-conns",
        ),
    ];
    for (args, flag) in cases {
        let exit = run(args);
        assert!(!exit.status.success(), "{args:?} was accepted");
        let lines: Vec<&str> = exit.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {:?}", exit.stderr);
        assert!(lines[0].contains(flag), "{args:?}: {:?} does not name {flag}", lines[0]);
        assert!(exit.stdout.is_empty(), "{args:?} printed {:?}", exit.stdout);
    }
    // The port that was in use is still only ours: nothing was left bound by the failed start.
    drop(taken);
}

#[test]
fn help_lists_every_flag() {
    let exit = run(&["--help"]);
    assert!(exit.status.success());
    for flag in [
        "--listen",
        "--backend",
        "--affinity",
        "--sticky-timeout",
        "--connect-timeout",
        "--idle-timeout",
        "--workers",
        "--max-conns",
        "--splice",
        "--grace",
        "--seed",
    ] {
        assert!(exit.stdout.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn sigterm_stops_accepting_and_lets_open_sessions_finish() {
    let pool = backends(41, 1);
    let mut t = tether(41, &pool, &["--grace", "60s"]);
    let (mut held, name) = hold(client_ip(1), t.addr()).unwrap();
    assert_eq!(name, "b0");
    t.signal(Signal::SIGTERM).unwrap();
    // New clients are refused once the listeners are closed: refused, not accepted by the
    // kernel into a backlog nobody serves (a descriptor kept for upgrades held the socket
    // listening; such clients hung until the process exited).
    let refused = || {
        connect_from(client_ip(2), t.addr(), Duration::from_secs(2))
            .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)
    };
    assert!(wait_until(DEADLINE, refused), "listener still accepting after SIGTERM");
    // ...while the open session still works and the process waits for it.
    assert!(t.wait_exit(Duration::from_millis(300)).is_none(), "exited with a session open");
    held.write_all(b"x").unwrap(); // `hold` closes when the client sends anything
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    drop(held);
    let status = t.wait_exit(DEADLINE).expect("tether exits once the session ended");
    assert!(status.success(), "{status:?}");
}

#[test]
fn grace_period_ends_sessions_that_do_not_finish() {
    let pool = backends(42, 1);
    let mut t = tether(42, &pool, &["--grace", "1s"]);
    let (mut held, _) = hold(client_ip(1), t.addr()).unwrap();
    let started = Instant::now();
    t.signal(Signal::SIGINT).unwrap();
    let status = t.wait_exit(DEADLINE).expect("tether exits after the grace period");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "exited before the grace period");
    let mut rest = Vec::new();
    let _ = held.read_to_end(&mut rest); // closed by tether: EOF (or a reset), never a hang
}

#[test]
fn a_session_cut_by_the_grace_period_ends_in_a_reset_not_a_clean_eof() {
    let pool = backends(45, 1);
    let mut t = tether(45, &pool, &["--grace", "500ms"]);
    let mut s = connect_from(client_ip(1), t.addr(), DEADLINE).unwrap();
    send_command(&mut s, &format!("source {}", 64 << 20)).unwrap();
    let mut first = [0u8; 1024];
    s.read_exact(&mut first).unwrap();
    t.signal(Signal::SIGTERM).unwrap();
    assert!(t.wait_exit(DEADLINE).expect("exits after the grace period").success());
    let mut rest = Vec::new();
    let end = s.read_to_end(&mut rest);
    // A clean EOF here would be a silent truncation of the 64 MiB stream.
    assert_eq!(end.expect_err("a reset").kind(), ErrorKind::ConnectionReset);
}

#[test]
fn idle_sessions_are_closed_after_the_idle_timeout() {
    let pool = backends(43, 1);
    let t = tether(43, &pool, &["--idle-timeout", "2s"]);
    let (mut held, _) = hold(client_ip(1), t.addr()).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    held.set_read_timeout(Some(DEADLINE)).unwrap();
    // Cut while open both ways: a reset, so the client cannot take it for the server's close.
    let err = held.read(&mut buf).expect_err("a reset from tether, not data or EOF");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "closed after {:?}",
        started.elapsed()
    );
    // A session with traffic is not idle: an echo kept busy for longer than the timeout lives.
    let mut s = connect_from(client_ip(2), t.addr(), DEADLINE).unwrap();
    send_command(&mut s, "echo").unwrap();
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        s.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).unwrap();
        std::thread::sleep(Duration::from_millis(100)); // traffic pacing, not synchronisation
    }
}

#[test]
fn max_conns_refuses_extra_clients_and_recovers() {
    let pool = backends(44, 1);
    let t = tether(44, &pool, &["--max-conns", "2"]);
    let (a, _) = hold(client_ip(1), t.addr()).unwrap();
    let (_b, _) = hold(client_ip(2), t.addr()).unwrap();
    // Refused with a reset: it may even beat the end of connect(2).
    match connect_from(client_ip(3), t.addr(), DEADLINE) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(mut s) => {
            let _ = send_command(&mut s, "name");
            let mut buf = Vec::new();
            match s.read_to_end(&mut buf) {
                Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
                Ok(_) => assert!(buf.is_empty(), "third client was served: {buf:?}"),
            }
        }
    }
    drop(a);
    assert!(
        wait_until(DEADLINE, || ask_name(client_ip(3), t.addr()).is_ok()),
        "a slot never freed up"
    );
}

#[test]
fn a_small_fd_limit_still_serves_many_sessions() {
    // Hosts with a hard limit of 1024 exist; tether must size its limits from it, not refuse.
    let pool = backends(46, 1);
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=1024:1024", "--"]).arg(bin());
    cmd.args(["--listen", "127.0.46.1:0", "--workers", "2", "--health-check", "off"]);
    cmd.args(backend_args(&pool));
    let t = Tether::start_command(cmd).expect("start tether under prlimit");
    let held: Vec<_> = (0..100)
        .map(|i| hold(client_ip(i), t.addr()).unwrap_or_else(|e| panic!("session {i}: {e}")))
        .collect();
    assert_eq!(held.len(), 100);
    assert_eq!(ask_name(client_ip(200), t.addr()).unwrap(), "b0");
}

/// Clients already in the listener's queue when SIGTERM closes it are served in the grace
/// period, not reset by the close (F11, as a reload does). A restart under load used to reset
/// every client the kernel had queued (chaos suite, issue 15). The worker is frozen so that the
/// clients queue up after the signal and before the worker closes its listener.
#[test]
fn sigterm_serves_the_clients_already_queued() {
    let pool = backends(150, 1);
    let mut args =
        vec!["--listen".to_string(), "127.0.150.1:0".into(), "--workers".into(), "1".into()];
    args.extend(backend_args(&pool));
    args.extend(["--grace".into(), "60s".into()]);
    let mut t = Tether::start(bin(), no_probes(&args)).expect("start tether");
    assert_eq!(ask_name(client_ip(0), t.addr()).unwrap(), "b0");
    let frozen = FrozenThread::freeze(t.pid(), "tether-w0").expect("stop the worker");
    t.signal(Signal::SIGTERM).unwrap();
    assert!(t.wait_stderr(|l| l.contains("closing listeners"), DEADLINE));
    let queued: Vec<_> = (1..4)
        .map(|i| {
            let mut s = connect_from(client_ip(i), t.addr(), DEADLINE).unwrap();
            send_command(&mut s, "name").unwrap();
            s
        })
        .collect();
    drop(frozen);
    for (i, mut s) in queued.into_iter().enumerate() {
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap_or_else(|e| panic!("queued client {i}: {e}"));
        assert_eq!(reply, "b0\n", "queued client {i}");
    }
    let status = t.wait_exit(DEADLINE).expect("tether exits once the sessions ended");
    assert!(status.success(), "{status:?}");
}
