//! The disruption preview (issue 17, part 2): `POST /api/services/{service}/preview` says, without
//! applying anything, how many pinned clients a change would move and how many sessions it
//! would cut; applied, the change then moves exactly that many (a quiet pool of 1,000 pinned
//! clients).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use common::*;

const CLIENTS: u32 = 1000;

/// Where every client goes now (each connects once; its pin stays after it closes).
fn placement(to: SocketAddr) -> HashMap<IpAddr, String> {
    (0..CLIENTS).map(|i| (client_ip(i), ask_name(client_ip(i), to).unwrap())).collect()
}

fn moved(before: &HashMap<IpAddr, String>, after: &HashMap<IpAddr, String>) -> u64 {
    before.iter().filter(|(c, b)| after[*c] != **b).count() as u64
}

fn preview(admin: SocketAddr, body: &str) -> serde_json::Value {
    let r = http(admin, "POST", "/api/services/default/preview", body).unwrap();
    assert_eq!(r.status, 200, "{body}: {}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

fn apply(admin: SocketAddr, method: &str, path: &str, body: &str) {
    let r = http(admin, method, path, body).unwrap();
    assert!(r.status == 200 || r.status == 201, "{method} {path}: {}", r.body);
}

#[test]
fn each_kind_of_change_moves_exactly_the_pinned_clients_its_preview_said() {
    let pool = backends(173, 4);
    let t = tether_with_admin(173, &pool, &["--seed", "3"]);
    let admin = t.admin();
    let mut now = placement(t.addr());

    // Into maintenance: b1's pinned clients move, nobody else.
    let p = preview(admin, r#"{"state":{"b1":"maint"}}"#);
    let b1_pins = api_backend(admin, "b1")["sticky_clients"].as_u64().unwrap();
    assert!(b1_pins > 100, "{b1_pins}");
    assert_eq!(p["pinned_clients_moving"], b1_pins, "{p}");
    assert_eq!(p["sessions_cut"], 0);
    let share = p["slots_changing"].as_f64().unwrap();
    assert!((0.15..0.35).contains(&share), "b1's share of the table: {share}");
    assert_eq!(api_backend(admin, "b1")["state"], "ready", "a preview applies nothing");
    apply(admin, "PUT", "/api/services/default/backends/b1", r#"{"state":"maint"}"#);
    let next = placement(t.addr());
    assert_eq!(moved(&now, &next), b1_pins);
    now = next;
    // Back to ready: pins hold, nobody moves back.
    let p = preview(admin, r#"{"state":{"b1":"ready"}}"#);
    assert_eq!(p["pinned_clients_moving"], 0, "{p}");
    apply(admin, "PUT", "/api/services/default/backends/b1", r#"{"state":"ready"}"#);
    let next = placement(t.addr());
    assert_eq!(moved(&now, &next), 0);
    now = next;

    // Removing b2: its pinned clients move; the table loses about a quarter.
    let b2_pins = api_backend(admin, "b2")["sticky_clients"].as_u64().unwrap();
    let p = preview(admin, r#"{"remove":"b2"}"#);
    assert_eq!(p["pinned_clients_moving"], b2_pins, "{p}");
    let share = p["slots_changing"].as_f64().unwrap();
    assert!((0.2..0.35).contains(&share), "{share}");
    apply(admin, "DELETE", "/api/services/default/backends/b2", "");
    let next = placement(t.addr());
    assert_eq!(moved(&now, &next), b2_pins);
    now = next;

    // A weight and a new backend: pins hold, so nobody moves, though the table changes.
    let p = preview(admin, r#"{"weight":{"b0":3}}"#);
    assert_eq!(p["pinned_clients_moving"], 0, "{p}");
    let share = p["slots_changing"].as_f64().unwrap();
    assert!((0.1..0.6).contains(&share), "{share}");
    apply(admin, "PUT", "/api/services/default/backends/b0", r#"{"weight":3}"#);
    let next = placement(t.addr());
    assert_eq!(moved(&now, &next), 0);
    now = next;
    let extra = Backend::start("b9", "127.0.173.99:0".parse().unwrap()).unwrap();
    let body = format!(r#"{{"add":{{"address":"{}","name":"b9"}}}}"#, extra.addr());
    let p = preview(admin, &body);
    assert_eq!(p["pinned_clients_moving"], 0, "{p}");
    let share = p["slots_changing"].as_f64().unwrap();
    assert!((0.1..0.3).contains(&share), "{share}");
    apply(
        admin,
        "POST",
        "/api/services/default/backends",
        &format!(r#"{{"address":"{}","name":"b9"}}"#, extra.addr()),
    );
    let next = placement(t.addr());
    assert_eq!(moved(&now, &next), 0);
}

#[test]
fn a_preview_counts_the_sessions_on_down_kill_would_cut_and_refuses_bad_proposals() {
    let pool = backends(174, 2);
    let t = tether_with_admin(174, &pool, &["--on-down", "kill"]);
    let admin = t.admin();
    let held: Vec<_> = (0..20).map(|i| hold(client_ip(i), t.addr()).unwrap()).collect();
    let on_b0 = held.iter().filter(|(_, n)| n == "b0").count() as u64;
    assert!(wait_until(DEADLINE, || api_backend(admin, "b0")["sessions"] == on_b0));
    let p = preview(admin, r#"{"state":{"b0":"maint"}}"#);
    assert_eq!(p["sessions_cut"], on_b0, "{p}");
    let b0 = p["backends"].as_array().unwrap().iter().find(|b| b["name"] == "b0").unwrap();
    assert_eq!(b0["sessions_cut"], on_b0);
    // Draining cuts nothing and moves no pin.
    let p = preview(admin, r#"{"state":{"b0":"drain"}}"#);
    assert_eq!(
        (p["sessions_cut"].as_u64(), p["pinned_clients_moving"].as_u64()),
        (Some(0), Some(0))
    );

    for (body, status) in [
        (r#"{"remove":"b0","weight":{"b1":2}}"#, 400),
        (r#"{}"#, 400),
        (r#"{"remove":"nope"}"#, 404),
        (r#"{"weight":{"b1":0}}"#, 400),
        (r#"{"state":{"b1":"asleep"}}"#, 400),
        (r#"{"add":{"address":"127.0.174.50:1","name":"b1"}}"#, 409),
        (r#"{"frobnicate":1}"#, 400),
        ("not json", 400),
    ] {
        let r = http(admin, "POST", "/api/services/default/preview", body).unwrap();
        assert_eq!(r.status, status, "{body}: {}", r.body);
    }
    let r = http(admin, "POST", "/api/services/other/preview", r#"{"remove":"b0"}"#).unwrap();
    assert_eq!(r.status, 404);
    let r = http(admin, "GET", "/api/services/default/preview", "").unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(api_backend(admin, "b0")["state"], "ready");
    assert_eq!(api_backend(admin, "b1")["weight"], 1);
    drop(held);
}

#[test]
fn a_dry_run_reload_previews_a_whole_file_and_the_reload_then_moves_that_many() {
    let pool = backends(175, 4);
    let text = |names: &[&str], b0_weight: u32| {
        let mut s = "admin = \"127.0.175.1:0\"\n[[service]]\nname = \"default\"\nlisten = [\"127.0.175.1:0\"]\nhealth-check = \"off\"\nseed = 3\n".to_string();
        for b in pool.iter().filter(|b| names.contains(&b.name())) {
            let w = if b.name() == "b0" { b0_weight } else { 1 };
            s += &format!(
                "[[service.backend]]\nname = \"{}\"\naddress = \"{}\"\nweight = {w}\n",
                b.name(),
                b.addr()
            );
        }
        s
    };
    let file = ConfigFile::new("preview", &text(&["b0", "b1", "b2", "b3"], 1));
    let t = Tether::start(bin(), ["--config", file.path()]).expect("start");
    let admin = t.admin();
    let now = placement(t.addr());

    // Without b2, and b0 at weight 2: b2's pinned clients move, nobody else.
    let next_text = text(&["b0", "b1", "b3"], 2);
    let r = http(admin, "POST", "/api/reload?dry_run=1", &next_text).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let p: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let b2_pins = api_backend(admin, "b2")["sticky_clients"].as_u64().unwrap();
    assert!(b2_pins > 100);
    assert_eq!(p["pinned_clients_moving"], b2_pins, "{p}");
    assert_eq!(p["services"][0]["sessions_cut"], 0);
    let share = p["services"][0]["slots_changing"].as_f64().unwrap();
    assert!((0.25..0.7).contains(&share), "{share}");
    assert_eq!(api_backends(admin).len(), 4, "a dry run applies nothing");

    // The same from the shell: `tether check --config FILE --admin ADDR`.
    let next_file = ConfigFile::new("preview-next", &next_text);
    let out = std::process::Command::new(bin())
        .args(["check", "--config", next_file.path(), "--admin", &admin.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("ok: 1 service (default), 3 backends\n"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "reloading it would move {b2_pins} pinned clients and cut 0 sessions"
        )),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("(b2 {b2_pins})")), "{stdout}");
    let closed = std::net::TcpListener::bind("127.0.175.200:0").unwrap().local_addr().unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "--config", next_file.path(), "--admin", &closed.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "an instance nobody answers for");

    // A bad file is refused with the reason, and nothing changes.
    let r = http(admin, "POST", "/api/reload?dry_run=1", "[[service]]\nname = 3\n").unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("name"), "{}", r.body);

    file.write(&next_text);
    let r = http(admin, "POST", "/api/reload", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(moved(&now, &placement(t.addr())), b2_pins);
}
