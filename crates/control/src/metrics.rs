//! `/metrics` in the Prometheus text exposition format (version 0.0.4).

use std::fmt::Write;

use crate::registry::Registry;

/// Render every metric. Counters end in `_total`; label values are escaped.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(8192);
    // One snapshot per worker, read once: the totals and the per-worker families agree.
    let workers: Vec<proxy::Counts> = registry.stats.iter().map(|s| s.counts()).collect();
    let mut total = proxy::Counts::default();
    for w in &workers {
        total += *w;
    }
    counters(&mut out, &total, registry);
    state_file(&mut out, registry);
    per_worker(&mut out, &workers, registry);
    process(&mut out, registry);
    services(&mut out, registry);
    backends(&mut out, registry);
    peers(&mut out, registry);
    out
}

/// Per peer (`--peer`): connection, queue, changes each way, resyncs, refusals.
fn peers(out: &mut String, registry: &Registry) {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(p) = &registry.peering else { return };
    let per = |f: &dyn Fn(&crate::peering::PeerStats) -> f64| -> Vec<(String, f64)> {
        p.peers.iter().map(|s| (format!("peer=\"{}\"", s.name), f(s))).collect()
    };
    let rows: [Family; 6] = [
        (
            "tether_peer_connected",
            "gauge",
            "1 while this instance's changes flow to the peer",
            per(&|s| f64::from(u8::from(s.state() == "connected"))),
        ),
        (
            "tether_peer_lag_entries",
            "gauge",
            "changes waiting to be sent to the peer",
            per(&|s| s.lag_entries() as f64),
        ),
        (
            "tether_peer_sent_total",
            "counter",
            "pin changes sent to the peer (full transfers included)",
            per(&|s| s.sent.load(Relaxed) as f64),
        ),
        (
            "tether_peer_received_total",
            "counter",
            "pin changes from the peer applied here",
            per(&|s| s.received.load(Relaxed) as f64),
        ),
        (
            "tether_peer_resyncs_total",
            "counter",
            "full transfers sent again after the peer's queue overflowed",
            per(&|s| s.resyncs.load(Relaxed) as f64),
        ),
        (
            "tether_peer_rejected_total",
            "counter",
            "handshakes and frames of the peer refused",
            per(&|s| s.rejected.load(Relaxed) as f64),
        ),
    ];
    for (name, kind, help, values) in rows {
        labelled(out, name, kind, help, &values);
    }
    let unknown = p.rejected_unknown.load(Relaxed) as f64;
    let dropped = p.dropped.load(Relaxed) as f64;
    plain(out, "tether_peer_unknown_rejected_total", "counter", "peer connections refused before naming a configured peer (wrong key, unknown name, garbage)", &[(String::new(), unknown)]);
    plain(out, "tether_peer_changes_dropped_total", "counter", "pin changes the workers made faster than they could be handed to the peers (each triggers a resync)", &[(String::new(), dropped)]);
}

/// Every worker counter, summed, as `proxy::stats` defines it; and health changes.
fn counters(out: &mut String, total: &proxy::Counts, registry: &Registry) {
    let mut families: Vec<Vec<(String, f64)>> = vec![Vec::new(); proxy::stats::FAMILIES.len()];
    for (exports, value) in total.exports() {
        for export in exports {
            match *export {
                proxy::stats::Export::Plain(name, help) => {
                    let _ = writeln!(
                        out,
                        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
                    );
                }
                proxy::stats::Export::In(family, member) => {
                    let at = proxy::stats::FAMILIES.iter().position(|f| std::ptr::eq(*f, family));
                    if let Some(list) = at.and_then(|i| families.get_mut(i)) {
                        list.push((format!("{}=\"{member}\"", family.label), value as f64));
                    }
                }
            }
        }
    }
    for (family, values) in proxy::stats::FAMILIES.iter().zip(&families) {
        labelled(out, family.name, "counter", family.help, values);
    }
    let name = "tether_health_transitions_total";
    let _ = writeln!(
        out,
        "# HELP {name} backend health changes (up <-> down)\n# TYPE {name} counter\n{name} {}",
        registry.transitions
    );
}

/// The state file: when it was last saved, what it held, what came back at start.
fn state_file(out: &mut String, registry: &Registry) {
    let s = &registry.state;
    let read = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let rows: [(&str, &str, &str, f64); 6] = [
        (
            "tether_state_saved_timestamp_seconds",
            "gauge",
            "when the state file was last saved (unix time; 0: never)",
            read(&s.saved_unix_ms) as f64 / 1000.0,
        ),
        ("tether_state_entries", "gauge", "pins in the last save", read(&s.entries) as f64),
        ("tether_state_bytes", "gauge", "size of the last save", read(&s.bytes) as f64),
        (
            "tether_state_save_errors_total",
            "counter",
            "state-file saves that failed (the previous file stays)",
            read(&s.errors) as f64,
        ),
        ("tether_state_entries_loaded", "gauge", "pins restored at start", read(&s.loaded) as f64),
        (
            "tether_state_entries_skipped",
            "gauge",
            "saved pins skipped at start (service or backend gone, expired, no room)",
            read(&s.skipped) as f64,
        ),
    ];
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
}

/// How the connections spread over the workers (F10), and whether each loop still turns.
fn per_worker(out: &mut String, workers: &[proxy::Counts], registry: &Registry) {
    let per_worker = |f: fn(&proxy::Counts) -> u64| -> Vec<(String, f64)> {
        workers.iter().enumerate().map(|(i, w)| (format!("worker=\"{i}\""), f(w) as f64)).collect()
    };
    labelled(
        out,
        "tether_worker_accepted_total",
        "counter",
        "TCP clients accepted, per worker",
        &per_worker(|w| w.accepted),
    );
    labelled(
        out,
        "tether_worker_flows_created_total",
        "counter",
        "UDP flows created, per worker",
        &per_worker(|w| w.flows_created),
    );
    let now_ms = registry.shared.now_ms(std::time::Instant::now());
    let heartbeat = |f: &dyn Fn(&proxy::Stats) -> f64| -> Vec<(String, f64)> {
        let each = registry.stats.iter().enumerate();
        each.map(|(i, s)| (format!("worker=\"{i}\""), f(s))).collect()
    };
    labelled(
        out,
        "tether_worker_loop_age_seconds",
        "gauge",
        "time since the worker last turned its event loop (woken every second)",
        &heartbeat(&|s| s.loop_age_ms(now_ms) as f64 / 1000.0),
    );
    labelled(
        out,
        "tether_worker_stalled",
        "gauge",
        "1 while the worker's loop has not turned for 2 s: its sessions and flows wait",
        &heartbeat(&|s| f64::from(u8::from(s.stalled(now_ms)))),
    );
}

/// The admin server, and what is open now across the process.
fn process(out: &mut String, registry: &Registry) {
    let admin = &registry.admin;
    let read =
        |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
    let admin_rows: [Family; 4] = [
        (
            "tether_admin_connections",
            "gauge",
            "admin HTTP connections open now",
            vec![(String::new(), read(&admin.open))],
        ),
        (
            "tether_admin_connections_refused_total",
            "counter",
            "admin connections closed at once because --admin-max-conns were open",
            vec![(String::new(), read(&admin.refused))],
        ),
        (
            "tether_admin_accept_errors_total",
            "counter",
            "accept(2) failures on the admin listener (retried after a back-off)",
            vec![(String::new(), read(&admin.accept_errors))],
        ),
        (
            "tether_admin_timeouts_total",
            "counter",
            "admin connections closed for a request head, body or idle wait past --admin-timeout",
            vec![(String::new(), read(&admin.timeouts))],
        ),
    ];
    for (name, kind, help, values) in admin_rows {
        plain(out, name, kind, help, &values);
    }
    let active = registry.shared.active.load(std::sync::atomic::Ordering::Relaxed);
    gauge(out, "tether_sessions_active", "TCP sessions open now", &[("", active as f64)]);
    let flows = registry.shared.flow_budget.used();
    gauge(out, "tether_flows_active", "UDP flows open now", &[("", flows as f64)]);
    if let Some(log) = &registry.shared.session_log {
        use std::sync::atomic::Ordering::Relaxed;
        let written = log.written.load(Relaxed) as f64;
        let dropped = log.dropped.load(Relaxed) as f64;
        plain(
            out,
            "tether_session_log_lines_total",
            "counter",
            "session log lines written (--log-sessions)",
            &[(String::new(), written)],
        );
        plain(
            out,
            "tether_session_log_dropped_total",
            "counter",
            "session log lines dropped because the writer was behind (a worker never waits for it)",
            &[(String::new(), dropped)],
        );
    }
    let offload = if registry.offload.enabled { 1.0 } else { 0.0 };
    gauge(
        out,
        "tether_udp_offload_enabled",
        "1 when established UDP flows are forwarded by the kernel (see /api/status for why not)",
        &[("", offload)],
    );
}

/// Per service: sticky table and per-source limits.
fn services(out: &mut String, registry: &Registry) {
    let tracked: Vec<(String, f64)> = registry
        .services
        .iter()
        .flatten()
        .filter_map(|s| {
            let l = s.limiter.as_ref()?;
            Some((format!("service=\"{}\"", escape(&s.config.name)), l.len() as f64))
        })
        .collect();
    labelled(
        out,
        "tether_tracked_sources",
        "gauge",
        "client IPs the per-source limits track",
        &tracked,
    );
    let mut sticky_size = Vec::new();
    let mut sticky_evicted = Vec::new();
    for s in registry.services.iter().flatten() {
        let label = format!("service=\"{}\"", escape(&s.config.name));
        let st = s.sticky.stats();
        sticky_size.push((label.clone(), s.sticky.len() as f64));
        sticky_evicted.push((label, (st.evicted_expired + st.evicted_idle) as f64));
    }
    labelled(out, "tether_sticky_entries", "gauge", "sticky entries held", &sticky_size);
    labelled(
        out,
        "tether_sticky_evictions_total",
        "counter",
        "idle sticky entries evicted to make room",
        &sticky_evicted,
    );
}

/// Per backend: sessions, flows, pins, failures, bytes, settings and states.
fn backends(out: &mut String, registry: &Registry) {
    let views = registry.backends();
    for (name, kind, help, values) in backend_rows(&views) {
        labelled(out, name, kind, help, &values);
    }
    let states: Vec<(String, f64)> = views
        .iter()
        .flat_map(|b| {
            ["ready", "drain", "maint"].into_iter().map(move |s| {
                let label = format!(
                    "service=\"{}\",backend=\"{}\",state=\"{s}\"",
                    escape(&b.service),
                    escape(&b.name)
                );
                (label, f64::from(u8::from(b.state.as_str() == s)))
            })
        })
        .collect();
    labelled(out, "tether_backend_state", "gauge", "admin state (1 for the current one)", &states);
}

/// The per-backend families, labelled with service, backend and address: a table.
fn backend_rows(views: &[crate::registry::BackendView]) -> [Family; 16] {
    let per = |f: &dyn Fn(&crate::registry::BackendView) -> f64| -> Vec<(String, f64)> {
        views
            .iter()
            .map(|b| {
                let label = format!(
                    "service=\"{}\",backend=\"{}\",address=\"{}\"",
                    escape(&b.service),
                    escape(&b.name),
                    b.address
                );
                (label, f(b))
            })
            .collect()
    };
    [
        (
            "tether_backend_sessions",
            "gauge",
            "TCP sessions open to the backend",
            per(&|b| b.sessions as f64),
        ),
        (
            "tether_backend_sessions_total",
            "counter",
            "TCP sessions established to the backend",
            per(&|b| b.sessions_total as f64),
        ),
        (
            "tether_backend_flows",
            "gauge",
            "UDP flows open to the backend",
            per(&|b| b.flows as f64),
        ),
        (
            "tether_backend_flows_total",
            "counter",
            "UDP flows opened to the backend",
            per(&|b| b.flows_total as f64),
        ),
        (
            "tether_backend_sticky_clients",
            "gauge",
            "clients pinned to the backend",
            per(&|b| b.sticky_clients as f64),
        ),
        (
            "tether_backend_failures_total",
            "counter",
            "passive failures: refused or timed-out connects, UDP port unreachable",
            per(&|b| b.failures as f64),
        ),
        (
            "tether_backend_bytes_in_total",
            "counter",
            "TCP bytes client -> backend",
            per(&|b| b.bytes_in as f64),
        ),
        (
            "tether_backend_bytes_out_total",
            "counter",
            "TCP bytes backend -> client",
            per(&|b| b.bytes_out as f64),
        ),
        (
            "tether_backend_datagrams_in_total",
            "counter",
            "UDP datagrams client -> backend (kernel-forwarded ones included)",
            per(&|b| b.datagrams_in as f64),
        ),
        (
            "tether_backend_datagrams_out_total",
            "counter",
            "UDP datagrams backend -> client (kernel-forwarded ones included)",
            per(&|b| b.datagrams_out as f64),
        ),
        (
            "tether_backend_datagram_bytes_in_total",
            "counter",
            "UDP payload bytes client -> backend",
            per(&|b| b.datagram_bytes_in as f64),
        ),
        (
            "tether_backend_datagram_bytes_out_total",
            "counter",
            "UDP payload bytes backend -> client",
            per(&|b| b.datagram_bytes_out as f64),
        ),
        ("tether_backend_weight", "gauge", "the backend's weight", per(&|b| b.weight as f64)),
        (
            "tether_backend_max_conns",
            "gauge",
            "the backend's max-conns (0: no limit)",
            per(&|b| f64::from(b.max_conns.unwrap_or(0))),
        ),
        (
            "tether_backend_up",
            "gauge",
            "1 if health checks say up",
            per(&|b| f64::from(u8::from(b.health == health::Health::Up))),
        ),
        (
            "tether_backend_ready",
            "gauge",
            "1 if the admin state is ready (0: drain or maint)",
            per(&|b| f64::from(u8::from(b.state == health::AdminState::Ready))),
        ),
    ]
}

/// Name, type, help text and labelled values of one metric family.
type Family = (&'static str, &'static str, &'static str, Vec<(String, f64)>);

fn gauge(out: &mut String, name: &str, help: &str, values: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (_, v) in values {
        let _ = writeln!(out, "{name} {v}");
    }
}

fn labelled(out: &mut String, name: &str, kind: &str, help: &str, values: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in values {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

fn plain(out: &mut String, name: &str, kind: &str, help: &str, values: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (_, v) in values {
        let _ = writeln!(out, "{name} {v}");
    }
}

/// Escape a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
