//! `/metrics` by Prometheus's own rules, and the example Grafana dashboard against it (issue
//! 16): `promtool check metrics` (Debian's `prometheus` package; scripts/test.sh installs it)
//! must accept the exposition, and every metric docs/grafana-dashboard.json queries must exist.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

/// A tether with traffic behind it and every optional family on (the session log).
fn scraped() -> (Tether, Vec<Backend>, String) {
    let pool = backends(162, 2);
    let t = tether_with_admin(162, &pool, &["--log-sessions"]);
    for i in 0..4 {
        ask_name(client_ip(1620 + i), t.addr()).unwrap();
    }
    assert!(wait_until(DEADLINE, || scrape(&t, "tether_sessions_closed_total", "") >= 4.0));
    let body = http(t.admin(), "GET", "/metrics", "").unwrap().body;
    (t, pool, body)
}

#[test]
fn promtool_accepts_the_metrics() {
    let (_t, _pool, body) = scraped();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool: scripts/test.sh installs it (apt-get install prometheus)");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}");
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_that_exist() {
    let (_t, _pool, body) = scraped();
    let families: BTreeSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut used = BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} queries nothing", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("tether_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                used.insert(name);
            }
        }
    }
    assert!(used.len() >= 15, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|m| !families.contains(m.as_str())).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics tether does not have: {missing:?}");
    // The instance variable's query too.
    let var = dash["templating"]["list"][0]["query"].as_str().unwrap();
    assert!(var.contains("tether_sessions_active") && families.contains("tether_sessions_active"));
}
