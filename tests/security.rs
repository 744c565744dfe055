//! Hardening (issue 6): privilege drop after binding, the admin token.

mod common;

use std::net::SocketAddr;

use common::*;

fn status_ids(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap().to_string();
    line[field.len()..].split_whitespace().map(|v| v.parse().unwrap()).collect()
}

#[test]
fn privilege_drop_leaves_the_process_non_root_with_listeners_working() {
    let pool = backends(82, 1);
    // A privileged port (< 1024) on a loopback address of this test only: bound as root, served
    // as nobody.
    let low: SocketAddr = "127.0.82.1:99".parse().unwrap();
    let mut args = vec![
        "--listen".to_string(),
        low.to_string(),
        "--admin".into(),
        "127.0.82.1:0".into(),
        "--user".into(),
        "nobody".into(),
    ];
    args.extend(backend_args(&pool));
    if !nix::unistd::geteuid().is_root() {
        // Without root there is nothing to drop: tether says so and does not start.
        let exit = run_to_exit(bin(), no_probes(&args), DEADLINE).unwrap();
        assert_ne!(exit.status.code(), Some(0));
        assert!(exit.stderr.contains("--user"), "{}", exit.stderr);
        return;
    }
    let t = Tether::start(bin(), no_probes(&args)).expect("start tether as root");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a user nobody").uid;
    // Real, effective, saved and filesystem uids: all nobody's.
    assert_eq!(status_ids(t.pid(), "Uid:"), vec![nobody.as_raw(); 4]);
    let gids = status_ids(t.pid(), "Gid:");
    assert!(gids.iter().all(|&g| g != 0), "still in group root: {gids:?}");
    assert!(status_ids(t.pid(), "Groups:").iter().all(|&g| g != 0));
    // Every worker thread too (setuid applies to the whole process).
    for task in std::fs::read_dir(format!("/proc/{}/task", t.pid())).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(!uid_line.split_whitespace().skip(1).any(|u| u == "0"), "{uid_line}");
    }
    assert_eq!(t.addr(), low);
    assert_eq!(ask_name(client_ip(0), low).unwrap(), "b0");
    assert_eq!(http(t.admin(), "GET", "/api/backends", "").unwrap().status, 200);
}

#[test]
fn the_admin_token_guards_every_change_and_nothing_else() {
    let pool = backends(83, 2);
    let dir = std::env::temp_dir();
    let token_file = dir.join(format!("tether-token-{}", std::process::id()));
    std::fs::write(&token_file, "s3cret-t0ken-of-some-length\n").unwrap();
    let flag = token_file.to_str().unwrap();
    let t = tether_with_admin(83, &pool, &["--admin-token-file", flag]);
    let admin = t.admin();
    let path = "/api/services/default/backends/b0";
    let body = r#"{"state":"drain"}"#;
    for auth in
        ["", "Bearer nope", "Bearer s3cret-t0ken-of-some-lengthX", "s3cret-t0ken-of-some-length"]
    {
        let r = http_with(admin, "PUT", path, body, auth);
        assert_eq!(r.status, 401, "{auth:?}: {}", r.body);
        assert!(r.body.contains("\"error\""));
    }
    let r = http(admin, "POST", "/api/reload", "").unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(api_backend(admin, "b0")["state"], "ready", "a refused request changed something");
    let r = http_with(admin, "PUT", path, body, "Bearer s3cret-t0ken-of-some-length");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(api_backend(admin, "b0")["state"], "drain");
    assert_eq!(http(admin, "GET", "/metrics", "").unwrap().status, 200);
    let _ = std::fs::remove_file(&token_file);

    // A token too short to be one is refused at start.
    let short = dir.join(format!("tether-short-token-{}", std::process::id()));
    std::fs::write(&short, "abc\n").unwrap();
    let mut args = vec![
        "--listen".to_string(),
        "127.0.83.1:0".into(),
        "--admin".into(),
        "127.0.83.1:0".into(),
        "--admin-token-file".into(),
        short.to_str().unwrap().into(),
    ];
    args.extend(backend_args(&pool));
    let exit = run_to_exit(bin(), no_probes(&args), DEADLINE).unwrap();
    assert_eq!(exit.status.code(), Some(1));
    assert!(exit.stderr.contains("at least 16"), "{}", exit.stderr);
    let _ = std::fs::remove_file(&short);
}

/// [`http`] with an `Authorization` header (none when empty).
fn http_with(addr: SocketAddr, method: &str, path: &str, body: &str, auth: &str) -> HttpReply {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let auth = if auth.is_empty() { String::new() } else { format!("Authorization: {auth}\r\n") };
    write!(s, "{method} {path} HTTP/1.0\r\n{auth}Content-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    HttpReply { status, content_type: String::new(), body: body.to_string() }
}
