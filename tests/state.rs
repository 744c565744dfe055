//! Pins that outlive the process (issue 12): the state file carries every service's sticky
//! table across a restart and a crash, and a torn or corrupted file is skipped, never trusted.

mod common;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use common::*;

const CLIENTS: u32 = 500;

/// A state file path of this test's own, removed when dropped.
struct StateFile(PathBuf);

impl StateFile {
    fn new(tag: &str) -> StateFile {
        let path = std::env::temp_dir().join(format!("tether-state-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        StateFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// tether in front of `pool` with an admin address and this state file.
fn start(net: u8, pool: &[Backend], state: &Path, extra: &[&str]) -> Tether {
    let mut args = vec!["--state-file", state.to_str().unwrap()];
    args.extend_from_slice(extra);
    tether_with_admin(net, pool, &args)
}

fn put_state(t: &Tether, backend: &str, state: &str) {
    let path = format!("/api/services/default/backends/{backend}");
    let r = http(t.admin(), "PUT", &path, &format!(r#"{{"state":"{state}"}}"#)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Pin `clients`, then move b0's clients away (maint, ask again: they re-pin elsewhere) and
/// put b0 back (ready moves nobody back). Returns where each client is now: a mapping the
/// table alone would not give.
fn pin_and_move(t: &Tether, clients: &[IpAddr]) -> Vec<String> {
    let first: Vec<String> = clients.iter().map(|&ip| ask_name(ip, t.addr()).unwrap()).collect();
    assert!(first.iter().any(|b| b == "b0"), "nobody on b0 to move");
    put_state(t, "b0", "maint");
    let now: Vec<String> = clients.iter().map(|&ip| ask_name(ip, t.addr()).unwrap()).collect();
    put_state(t, "b0", "ready");
    assert!(now.iter().all(|b| b != "b0"));
    now
}

/// Pin `clients`, stop b0 so that its clients fail over and re-pin, start it again on its
/// address (failover is not undone: they stay where they moved). Returns where each is now.
fn fail_over_b0(t: &Tether, pool: &mut [Backend], clients: &[IpAddr]) -> Vec<String> {
    let first: Vec<String> = clients.iter().map(|&ip| ask_name(ip, t.addr()).unwrap()).collect();
    let on_b0 = first.iter().filter(|b| *b == "b0").count();
    assert!(on_b0 > 0, "nobody on b0 to move");
    let addr = pool[0].addr();
    pool[0].stop();
    let now: Vec<String> = clients.iter().map(|&ip| ask_name(ip, t.addr()).unwrap()).collect();
    assert!(now.iter().all(|b| b != "b0"));
    pool[0] = Backend::start("b0", addr).expect("b0 again on its address");
    let again: Vec<String> = clients.iter().map(|&ip| ask_name(ip, t.addr()).unwrap()).collect();
    assert_eq!(again, now, "failover was undone when b0 came back");
    eprintln!("{on_b0} of {} clients failed over from b0", clients.len());
    now
}

fn clients(n: u32) -> Vec<IpAddr> {
    (0..n).map(client_ip).collect()
}

#[test]
fn a_restart_keeps_every_pin_failed_over_ones_included() {
    let mut pool = backends(110, 3);
    let state = StateFile::new("restart");
    let clients = clients(CLIENTS);
    let mut t = start(110, &pool, &state.0, &[]);
    let before = fail_over_b0(&t, &mut pool, &clients);
    t.signal(Signal::SIGTERM).unwrap();
    assert!(t.wait_exit(DEADLINE).is_some_and(|s| s.success()), "{}", t.stderr_text());
    assert!(t.stderr_text().contains(&format!("{CLIENTS} pins saved")), "{}", t.stderr_text());
    drop(t);

    let t = start(110, &pool, &state.0, &[]);
    assert!(t.wait_stderr(|l| l.contains(&format!("{CLIENTS} pins restored, 0 skipped")), DEADLINE));
    let after: Vec<String> = clients.iter().map(|&ip| ask_name(ip, t.addr()).unwrap()).collect();
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    assert_eq!(moved, 0, "{moved} of {CLIENTS} clients reached another backend after the restart");
    let api: serde_json::Value =
        serde_json::from_str(&http(t.admin(), "GET", "/api/state", "").unwrap().body).unwrap();
    assert_eq!(api["loaded"], CLIENTS);
    assert_eq!(api["file"], state.path());
}

#[test]
fn after_a_kill_9_the_pins_of_the_last_save_come_back() {
    let pool = backends(111, 3);
    let state = StateFile::new("crash");
    let clients = clients(100);
    let mut t = start(111, &pool, &state.0, &["--state-interval", "200ms"]);
    let before = pin_and_move(&t, &clients);
    // A save that began after the last ask holds every pin.
    let asked = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let saved_after = || {
        let body = http(t.admin(), "GET", "/api/state", "").unwrap().body;
        let api: serde_json::Value = serde_json::from_str(&body).unwrap();
        api["last_save_unix_ms"].as_u64().unwrap_or(0) > asked.as_millis() as u64 + 50
            && api["entries"] == 100
    };
    assert!(wait_until(DEADLINE, saved_after), "no save after the last pin");
    t.signal(Signal::SIGKILL).unwrap();
    t.wait_exit(DEADLINE).expect("killed");
    drop(t);

    let t = start(111, &pool, &state.0, &[]);
    assert!(t.wait_stderr(|l| l.contains("100 pins restored"), DEADLINE), "{}", t.stderr_text());
    for (ip, want) in clients.iter().zip(&before) {
        assert_eq!(&ask_name(*ip, t.addr()).unwrap(), want, "client {ip}");
    }
}

#[test]
fn a_torn_corrupted_empty_or_foreign_state_file_is_skipped_and_tether_serves() {
    let pool = backends(112, 2);
    let state = StateFile::new("corrupt");
    let mut t = start(112, &pool, &state.0, &[]);
    let _ = pin_and_move(&t, &clients(20));
    t.signal(Signal::SIGTERM).unwrap();
    t.wait_exit(DEADLINE).expect("stopped");
    drop(t);
    let good = std::fs::read(&state.0).unwrap();
    assert!(good.len() > 100, "{} bytes", good.len());
    let mut variants: Vec<(String, Vec<u8>)> =
        (0..10).map(|i| (format!("cut at {i}/10"), good[..good.len() * i / 10].to_vec())).collect();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    variants.push(("a flipped byte".into(), flipped));
    let mut other = good.clone();
    other[8] = other[8].wrapping_add(1);
    variants.push(("another version".into(), other));
    variants.push(("not a state file".into(), b"[[service]]\nname = \"x\"\n".to_vec()));
    for (what, bytes) in variants {
        std::fs::write(&state.0, &bytes).unwrap();
        let t = start(112, &pool, &state.0, &[]);
        let ignored =
            t.wait_stderr(|l| l.contains("state file") && l.contains("ignored"), DEADLINE);
        assert!(ignored, "{what}: not reported: {}", t.stderr_text());
        assert!(ask_name(client_ip(300), t.addr()).is_ok(), "{what}: tether does not serve");
        let body = http(t.admin(), "GET", "/api/state", "").unwrap().body;
        assert!(body.contains("\"loaded\":0"), "{what}: {body}");
    }
}

#[test]
fn a_state_file_that_cannot_be_written_stops_tether_at_start_with_the_reason() {
    let pool = backends(114, 1);
    let mut args = vec!["--listen".to_string(), "127.0.114.1:0".into()];
    args.extend(backend_args(&pool));
    args.extend(["--state-file".into(), "/nonexistent-tether-dir/state".into()]);
    let exit = run_to_exit(bin(), &args, DEADLINE).unwrap();
    assert_eq!(exit.status.code(), Some(1), "{}", exit.stderr);
    assert!(
        exit.stderr.contains("--state-file /nonexistent-tether-dir/state: cannot be written"),
        "{}",
        exit.stderr
    );
}
