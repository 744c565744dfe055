//! F10: per-core event loops and the kernel's spread of connections over them. A worker whose
//! loop stops turning (starved of CPU, stuck in a slow call) is reported, and with shared
//! listeners (the default) new clients go to the workers that are free. The test stops one
//! worker thread with ptrace(2) while the rest of the process runs.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const CLIENTS: u32 = 40;

fn stalled(t: &Tether, worker: u32) -> f64 {
    scrape(t, "tether_worker_stalled", &format!("worker=\"{worker}\""))
}

fn accepted(t: &Tether, worker: u32) -> f64 {
    scrape(t, "tether_worker_accepted_total", &format!("worker=\"{worker}\""))
}

#[test]
fn a_stalled_worker_is_reported_and_new_clients_go_to_the_free_one() {
    let pool = backends(38, 1);
    let t = tether_with_admin(38, &pool, &[]);
    assert_eq!(stalled(&t, 1), 0.0);
    let frozen = FrozenThread::freeze(t.pid(), "tether-w1").expect("stop worker 1");
    assert!(
        wait_until(DEADLINE, || stalled(&t, 1) == 1.0),
        "worker 1 never reported stalled: {}",
        t.stderr_text()
    );
    assert!(t.wait_stderr(|l| l.contains("worker 1 stalled"), DEADLINE), "{}", t.stderr_text());
    assert_eq!(stalled(&t, 0), 0.0, "the running worker is reported stalled");
    // Every new client is served while worker 1 stands still: worker 0 takes them all.
    let before = (accepted(&t, 0), accepted(&t, 1));
    for i in 0..CLIENTS {
        assert_eq!(ask_name(client_ip(i), t.addr()).unwrap(), "b0", "client {i}");
    }
    assert!(accepted(&t, 0) >= before.0 + f64::from(CLIENTS));
    assert_eq!(accepted(&t, 1), before.1);
    drop(frozen);
    assert!(t.wait_stderr(|l| l.contains("worker 1 runs again"), DEADLINE), "{}", t.stderr_text());
    assert!(wait_until(DEADLINE, || stalled(&t, 1) == 0.0));
    let events = http(t.admin(), "GET", "/api/events", "").unwrap().body;
    assert!(events.contains("worker 1 stalled"), "{events}");
}

/// With one SO_REUSEPORT socket per worker, the kernel hashes some new clients to the stalled
/// worker: they wait in its queue, and are served, none lost, once it runs again.
#[test]
fn with_per_worker_listeners_clients_of_a_stalled_worker_wait_and_are_served_after() {
    let pool = backends(39, 1);
    let t = tether_with_admin(39, &pool, &["--listeners", "per-worker"]);
    let frozen = FrozenThread::freeze(t.pid(), "tether-w1").expect("stop worker 1");
    let mut sent: Vec<(u32, TcpStream)> = (0..CLIENTS)
        .map(|i| {
            let mut s = connect_from(client_ip(i), t.addr(), DEADLINE).unwrap();
            send_command(&mut s, "name").unwrap();
            (i, s)
        })
        .collect();
    // Long enough for the free worker on a loaded machine; a client hashed to the stalled one
    // is still waiting then.
    let until = Instant::now() + Duration::from_secs(3);
    let mut waiting = Vec::new();
    for (i, mut s) in sent.drain(..) {
        let left = until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        let mut reply = String::new();
        if s.read_to_string(&mut reply).is_err() {
            waiting.push((i, s));
        } else {
            assert_eq!(reply, "b0\n", "client {i}");
        }
    }
    // 40 clients hashed over two sockets all missing the stalled one: odds of 2^-40.
    assert!(!waiting.is_empty(), "no client was hashed to the stalled worker");
    assert!(wait_until(DEADLINE, || stalled(&t, 1) == 1.0), "{}", t.stderr_text());
    assert!(t.wait_stderr(|l| l.contains("--listeners per-worker"), DEADLINE));
    drop(frozen);
    for (i, mut s) in waiting {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(reply, "b0\n", "client {i} after worker 1 ran again");
    }
}
