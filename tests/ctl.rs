//! `tether ctl` (issue 16): the admin API from a shell, tables by default and JSON with
//! `--json`, a non-zero exit with the API's error on failure.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn ctl(admin: SocketAddr, args: &[&str]) -> Ran {
    ctl_raw(&[&["ctl", "--admin", &admin.to_string()], args].concat())
}

fn ctl_raw(args: &[&str]) -> Ran {
    let out = Command::new(bin()).args(args).env_remove("TETHER_ADMIN").output().unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The row of `backend` in a `ctl backends` table, split into its cells.
fn row(table: &str, backend: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cells| cells.get(1).map(String::as_str) == Some(backend))
        .unwrap_or_else(|| panic!("no row for {backend} in\n{table}"))
}

#[test]
fn backends_drain_ready_weight_sticky_and_events_from_the_shell() {
    let pool = backends(154, 2);
    let t = tether_with_admin(154, &pool, &[]);
    let admin = t.admin();

    let out = ctl(admin, &["backends"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let header: Vec<&str> = out.stdout.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(&header[..6], ["SERVICE", "BACKEND", "ADDRESS", "STATE", "HEALTH", "WEIGHT"]);
    let b0 = row(&out.stdout, "b0");
    assert_eq!(b0[0], "default");
    assert_eq!(b0[2], pool[0].addr().to_string());
    assert_eq!(b0[3], "ready");

    // A client pinned to some backend: `sticky` tells which.
    let client = "127.0.154.100".parse().unwrap();
    let mut s = echo_session(client, t.addr());
    echo_roundtrip(&mut s, "hi").unwrap();
    let pinned = api_backends(admin)
        .iter()
        .find(|b| b["sticky_clients"].as_u64() == Some(1))
        .map(|b| b["name"].as_str().unwrap().to_string())
        .expect("a pin");
    let out = ctl(admin, &["sticky", "127.0.154.100"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("127.0.154.100 is pinned to default/{pinned}: 1 open sessions")),
        "{}",
        out.stdout
    );

    // Drain by bare name (one service has it), then back to ready by SERVICE/NAME.
    let out = ctl(admin, &["drain", &pinned]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with(&format!("default/{pinned}: drain")), "{}", out.stdout);
    assert_eq!(api_backend(admin, &pinned)["state"], "drain");
    assert_eq!(row(&ctl(admin, &["backends"]).stdout, &pinned)[3], "drain");
    let out = ctl(admin, &["ready", &format!("default/{pinned}")]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(api_backend(admin, &pinned)["state"], "ready");
    let out = ctl(admin, &["maint", "b1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(api_backend(admin, "b1")["state"], "maint");

    let out = ctl(admin, &["weight", "b1", "7"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "default/b1: weight 7\n");
    assert_eq!(api_backend(admin, "b1")["weight"], 7);

    // --json prints the API's answer.
    let out = ctl(admin, &["--json", "backends"]);
    let parsed: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(parsed.as_array().map(Vec::len), Some(2));
    let out = ctl(admin, &["--json", "status"]);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(status["pid"].as_u64(), Some(u64::from(t.pid())));
    let out = ctl(admin, &["status"]);
    assert!(out.stdout.contains(&format!("pid          {}", t.pid())), "{}", out.stdout);

    let out = ctl(admin, &["events"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.lines().any(|l| l.contains("maint")), "{}", out.stdout);
    assert!(out.stdout.lines().all(|l| l.as_bytes().get(4) == Some(&b'-')), "{}", out.stdout);
}

#[test]
fn failures_exit_non_zero_with_the_apis_error_and_change_nothing() {
    let pool = backends(155, 2);
    let token_file = std::env::temp_dir().join(format!("tether-ctl-token-{}", std::process::id()));
    std::fs::write(&token_file, "a-token-of-some-length-42\n").unwrap();
    let token = token_file.to_str().unwrap();
    let t = tether_with_admin(155, &pool, &["--admin-token-file", token]);
    let admin = t.admin();

    // Reads need no token; changes do.
    assert_eq!(ctl(admin, &["backends"]).code, 0);
    let out = ctl(admin, &["drain", "b0"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("401") && out.stderr.contains("--token-file"), "{}", out.stderr);
    assert_eq!(api_backend(admin, "b0")["state"], "ready");
    let out = ctl(admin, &["--token-file", token, "drain", "b0"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(api_backend(admin, "b0")["state"], "drain");

    // The API's own error, verbatim.
    let out = ctl(admin, &["--token-file", token, "weight", "b1", "5000"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("400") && out.stderr.contains("weight"), "{}", out.stderr);
    assert_eq!(api_backend(admin, "b1")["weight"], 1);
    let out = ctl(admin, &["--token-file", token, "drain", "nope"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no backend named \"nope\""), "{}", out.stderr);
    let out = ctl(admin, &["--token-file", token, "drain", "other/b0"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("404"), "{}", out.stderr);
    let out = ctl(admin, &["--token-file", token, "reload"]);
    assert_eq!(out.code, 1, "no config file to reload");
    assert!(out.stderr.contains("reload"), "{}", out.stderr);
    let out = ctl(admin, &["sticky", "not-an-ip"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not an IP address"), "{}", out.stderr);

    // Bad command lines exit 2; an address nobody answers on exits 1 and says where.
    assert_eq!(ctl(admin, &["frobnicate"]).code, 2);
    assert_eq!(ctl(admin, &["weight", "b1", "heavy"]).code, 2);
    assert_eq!(ctl_raw(&["ctl", "--admin", "not an address", "status"]).code, 2);
    let closed = std::net::TcpListener::bind("127.0.155.200:0").unwrap().local_addr().unwrap();
    let out = ctl(closed, &["status"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains(&closed.to_string()), "{}", out.stderr);
    let _ = std::fs::remove_file(&token_file);
}

#[test]
fn reload_reads_the_file_again() {
    let pool = backends(156, 2);
    let file = ConfigFile::new("ctl-reload", "");
    let write = |n: usize| {
        let mut toml = "admin = \"127.0.156.1:0\"\n[[service]]\nname = \"db\"\nlisten = [\"127.0.156.1:0\"]\nhealth-check = \"off\"\n".to_string();
        for b in &pool[..n] {
            toml += &format!(
                "[[service.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
                b.name(),
                b.addr()
            );
        }
        file.write(&toml);
    };
    write(1);
    let t = Tether::start(bin(), ["--config", file.path()]).expect("start");
    assert_eq!(api_backends(t.admin()).len(), 1);
    write(2);
    let out = ctl(t.admin(), &["reload"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("reloaded: "), "{}", out.stdout);
    assert_eq!(api_backends(t.admin()).len(), 2);
    // The name lookup finds b1 in service db.
    let out = ctl(t.admin(), &["drain", "b1"]);
    assert!(out.stdout.starts_with("db/b1: drain"), "{}", out.stdout);
}
