//! Limits that protect tether and its backends (issue 6): per-backend max-conns, running out of
//! file descriptors.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;

/// Sources (from `first` on) that the table sends to backend `name`, found by asking.
fn sources_of(t: &Tether, name: &str, first: u32, n: usize) -> Vec<IpAddr> {
    (first..first + 2000)
        .map(client_ip)
        .filter(|&ip| ask_name(ip, t.addr()).unwrap() == name)
        .take(n)
        .collect()
}

#[test]
fn a_full_backend_is_skipped_for_new_sessions_and_takes_them_again_when_a_place_frees() {
    let pool = backends(80, 2);
    let args = [
        "--listen".to_string(),
        "127.0.80.1:0".into(),
        "--backend".into(),
        format!("{},name=b0,max-conns=3", pool[0].addr()),
        "--backend".into(),
        format!("{},name=b1", pool[1].addr()),
        "--admin".into(),
        "127.0.80.1:0".into(),
    ];
    let t = Tether::start(bin(), no_probes(&args)).unwrap();
    let b0_clients = sources_of(&t, "b0", 0, 5);
    assert_eq!(b0_clients.len(), 5);
    // The asking sessions hold places of b0 until tether has seen them close.
    assert!(wait_until(DEADLINE, || api_backend(t.admin(), "b0")["sessions"] == 0));
    // Three sessions fill b0; they keep working.
    let mut open: Vec<_> = b0_clients[..3].iter().map(|&s| echo_session(s, t.addr())).collect();
    for s in open.iter_mut() {
        echo_roundtrip(s, "in").unwrap();
    }
    assert_eq!(api_backend(t.admin(), "b0")["sessions"], 3);
    assert_eq!(api_backend(t.admin(), "b0")["max_conns"], 3);
    // A fourth client of b0 (pinned there by its earlier session) goes to b1 meanwhile.
    assert_eq!(ask_name(b0_clients[3], t.addr()).unwrap(), "b1");
    for s in open.iter_mut() {
        echo_roundtrip(s, "still").unwrap();
    }
    // One ends: b0 takes new sessions again (the fifth client has not been moved).
    drop(open.pop());
    assert!(
        wait_until(DEADLINE, || api_backend(t.admin(), "b0")["sessions"] == 2),
        "the closed session was never counted out"
    );
    assert_eq!(ask_name(b0_clients[4], t.addr()).unwrap(), "b0");
    let metrics = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    assert!(metrics.contains("tether_backend_max_conns{service=\"default\",backend=\"b0\""));
}

#[test]
fn running_out_of_fds_backs_off_without_spinning_and_recovers() {
    // tether keeps 8 of 64 fds out of the session budget. Its own base use is about 7 (stdio,
    // two epolls, a waker) plus two per listener (the socket and the copy kept for upgrades)
    // plus whatever the environment leaks into it; eight more listeners overrun the budget on
    // any machine. Sessions take fds in pairs, so the parity of what is left decides where it
    // runs out: the second run gives tether one more inherited descriptor, so one of the two
    // runs out in accept(2) and the other on the backend socket, whatever the base.
    let logs: Vec<String> = [false, true].into_iter().map(|one| exhaust_fds(8, one)).collect();
    assert!(
        logs.iter().any(|l| l.contains("accept failed: Too many open files")),
        "accept(2) never failed in either run: {logs:#?}"
    );
    assert!(
        logs.iter().any(|l| l.contains("connect to") && l.contains("Too many open files")),
        "no backend socket failed in either run: {logs:#?}"
    );
}

/// Run tether under 64 fds with `extra` more listeners than it needs, hold sessions until it
/// runs out, check it pauses accepting without spinning, serves open sessions and recovers.
/// Returns its log.
fn exhaust_fds(extra: u8, inherit_one: bool) -> String {
    let pool = backends(81, 1);
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=64:64", "--"]).arg(bin());
    cmd.args(["--listen", "127.0.81.1:0", "--workers", "1", "--splice", "off"]);
    cmd.args(["--health-check", "off", "--max-conns", "28"]);
    for i in 0..extra {
        cmd.args(["--listen", &format!("127.0.81.{}:0", 2 + i)]);
    }
    cmd.args(backend_args(&pool));
    // A descriptor without close-on-exec (dup(2) does not set it) is inherited by the child;
    // closed here once the child has its copy.
    let inherited = inherit_one.then(|| nix::unistd::dup(2).expect("dup"));
    let t = Tether::start_command(cmd).expect("start tether under prlimit");
    if let Some(fd) = inherited {
        nix::unistd::close(fd).expect("close");
    }
    // One echo session to check open sessions keep being served.
    let mut echo = echo_session(client_ip(0), t.addr());
    echo_roundtrip(&mut echo, "first").unwrap();
    // Hold sessions until tether runs out of descriptors: a client is turned away (its
    // backend socket could not be made), or left unanswered in the accept queue (accept(2)
    // itself failed).
    let mut held = Vec::new();
    for i in 1..40 {
        let Ok(mut s) = connect_from(client_ip(i), t.addr(), DEADLINE) else { break };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if send_command(&mut s, "hold").is_err() || read_line(&mut s).is_err() {
            break;
        }
        held.push(s);
    }
    assert!((10..39).contains(&held.len()), "{} sessions held under 64 fds", held.len());
    // Whichever of accept(2) or the backend socket hit the limit first, accepting pauses.
    assert!(
        t.wait_stderr(
            |l| l.contains("Too many open files") && l.contains("accepting paused"),
            DEADLINE
        ),
        "accepting never paused for lack of fds: {}",
        t.stderr_text()
    );
    // More clients keep knocking while no descriptor is free.
    let knocking: Vec<_> = (100..120)
        .filter_map(|i| {
            let mut s = connect_from(client_ip(i), t.addr(), DEADLINE).ok()?;
            send_command(&mut s, "hold").ok()?;
            Some(s)
        })
        .collect();
    // Over two seconds of this, tether must not spin: well under a quarter of a core.
    let ticks = t.cpu_ticks().unwrap();
    std::thread::sleep(Duration::from_secs(2)); // a measurement window, not a synchronisation
    let used = t.cpu_ticks().unwrap() - ticks;
    assert!(used < 50, "{used} CPU ticks (1/100 s) in 2 s while out of fds");
    echo_roundtrip(&mut echo, "while exhausted").unwrap();
    // Descriptors come back: new clients are served again.
    drop(held);
    drop(knocking);
    assert!(
        wait_until(DEADLINE, || ask_name(client_ip(300), t.addr()).is_ok()),
        "never recovered: {}",
        t.stderr_text()
    );
    echo_roundtrip(&mut echo, "after").unwrap();
    t.stderr_text()
}
