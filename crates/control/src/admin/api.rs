//! The admin API's endpoints, behind the server in `super`: a request's method, path, query and
//! body in, an [`Answer`] out. Runs on a blocking thread; takes the registry lock as it needs.

use std::net::IpAddr;
use std::sync::Mutex;

use hyper::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Ask;
use crate::registry::{Refusal, Registry};

/// One request, as the endpoints see it: the token and the size and time limits are checked.
pub struct Call<'a> {
    pub method: &'a Method,
    /// Percent-encoded, as sent.
    pub path: &'a str,
    pub query: &'a str,
    pub body: &'a str,
}

/// A response: status, content type, body.
pub struct Answer {
    pub status: u16,
    pub kind: &'static str,
    pub body: String,
}

fn ok_json(v: Value) -> Answer {
    Answer { status: 200, kind: "application/json", body: v.to_string() }
}

pub fn error(status: u16, message: &str) -> Answer {
    Answer { status, kind: "application/json", body: json!({ "error": message }).to_string() }
}

fn refused(r: Refusal) -> Answer {
    match &r {
        Refusal::NotFound(m) => error(404, m),
        Refusal::Bad(m) => error(400, m),
        Refusal::Conflict(m) => error(409, m),
    }
}

/// Answer `call`.
pub fn route(
    call: &Call<'_>,
    registry: &Mutex<Registry>,
    asks: &crossbeam_channel::Sender<Ask>,
) -> Answer {
    let segments: Vec<String> =
        call.path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (method, segments, query, body) = (call.method, &segments[..], call.query, call.body);
    let lock = || registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match (method, segments) {
        (&Method::GET, []) => Answer {
            status: 200,
            kind: "text/html; charset=utf-8",
            body: include_str!("../status.html").to_string(),
        },
        (&Method::GET, ["metrics"]) => Answer {
            status: 200,
            kind: "text/plain; version=0.0.4; charset=utf-8",
            body: crate::metrics::render(&lock()),
        },
        (&Method::GET, ["api", "backends"]) => ok_json(backends_json(&lock())),
        (&Method::GET, ["api", "events"]) => ok_json(events_json(&lock())),
        (&Method::GET, ["api", "history"]) => ok_json(lock().history.json()),
        (&Method::GET, ["api", "sticky"]) => sticky(query, &lock()),
        (&Method::GET, ["api", "flows"]) => {
            let links = lock().workers.links.clone();
            flows(query, &links)
        }
        (&Method::GET, ["api", "state"]) => ok_json(state_json(&lock())),
        (&Method::GET, ["api", "status"]) => ok_json(status_json(&lock())),
        (&Method::GET, ["api", "peers"]) => ok_json(peers_json(&lock())),
        (&Method::PUT, ["api", "services", service, "backends", name]) => {
            change_backend(service, name, body, &mut lock())
        }
        (&Method::DELETE, ["api", "services", service, "backends", name]) => {
            match lock().remove_backend(service, name) {
                Ok(()) => ok_json(json!({ "removed": name })),
                Err(r) => refused(r),
            }
        }
        (&Method::POST, ["api", "services", service, "preview"]) => {
            match decode::<crate::preview::Proposed>(body) {
                Ok(proposed) => match crate::preview::preview(&lock(), service, &proposed) {
                    Ok(v) => ok_json(v),
                    Err(r) => refused(r),
                },
                Err(answer) => answer,
            }
        }
        (&Method::POST, ["api", "services", service, "backends"]) => {
            add_backend(service, body, &mut lock())
        }
        (&Method::POST, ["api", "upgrade"]) => {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if asks.send(Ask::Upgrade(tx)).is_err() {
                return error(503, "shutting down");
            }
            match rx.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(Ok(summary)) => ok_json(json!({ "upgraded": summary })),
                Ok(Err(e)) if e.contains("already") || e.contains("stopping") => error(409, &e),
                Ok(Err(e)) => error(500, &e),
                Err(_) => error(503, "the upgrade did not finish in 60s"),
            }
        }
        (&Method::POST, ["api", "reload"]) if dry_run(query) => {
            match crate::preview::reload_preview(&lock(), body) {
                Ok(v) => ok_json(v),
                Err(r) => refused(r),
            }
        }
        (&Method::POST, ["api", "reload"]) => {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if asks.send(Ask::Reload(tx)).is_err() {
                return error(503, "shutting down");
            }
            match rx.recv_timeout(std::time::Duration::from_secs(30)) {
                Ok(Ok(summary)) => ok_json(json!({ "reloaded": summary })),
                Ok(Err(e)) => error(e.status(), &e.to_string()),
                Err(_) => error(503, "the reload did not finish in 30s"),
            }
        }
        (
            _,
            []
            | ["metrics"]
            | ["api", "backends" | "events" | "history" | "sticky" | "reload" | "state" | "status"],
        )
        | (_, ["api", "services", _, "backends" | "preview", ..]) => {
            error(405, &format!("{method} is not allowed on /{}", segments.join("/")))
        }
        _ => error(404, &format!("no such endpoint: /{}", segments.join("/"))),
    }
}

/// `dry_run=1` (or `true`) in a query string.
fn dry_run(query: &str) -> bool {
    query.split('&').any(|p| p == "dry_run=1" || p == "dry_run=true" || p == "dry_run")
}

/// The body of `PUT /api/services/{service}/backends/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendChange {
    state: Option<String>,
    weight: Option<i64>,
}

/// The body of `POST /api/services/{service}/backends`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackend {
    address: String,
    weight: Option<i64>,
    name: Option<String>,
    max_conns: Option<i64>,
}

/// A JSON body decoded into `T`; a 400 naming the problem (serde's words: unknown field, missing
/// field, invalid type) otherwise.
fn decode<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, Answer> {
    serde_json::from_str(body).map_err(|e| {
        let why = match e.classify() {
            serde_json::error::Category::Data => format!("the body does not fit: {e}"),
            _ => format!("the body is not JSON: {e}"),
        };
        error(400, &why)
    })
}

fn change_backend(service: &str, name: &str, body: &str, registry: &mut Registry) -> Answer {
    let change: BackendChange = match decode(body) {
        Ok(change) => change,
        Err(a) => return a,
    };
    // Check everything before changing anything.
    let state = match change.state.as_deref().map(str::parse::<health::AdminState>) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => return error(400, &format!("state: {e}")),
    };
    let weight = match change.weight.map(config::check_weight) {
        None => None,
        Some(Ok(w)) => Some(w),
        Some(Err(p)) => return error(400, &format!("weight: {} {p}", change.weight.unwrap_or(0))),
    };
    if state.is_none() && weight.is_none() {
        return error(400, "nothing to change: give \"state\" and/or \"weight\"");
    }
    if let Err(r) = registry.find_backend(service, name) {
        return refused(r);
    }
    if let Some(w) = weight {
        if let Err(r) = registry.set_weight(service, name, w) {
            return refused(r);
        }
    }
    if let Some(s) = state {
        if let Err(r) = registry.set_state(service, name, s) {
            return refused(r);
        }
    }
    let view = registry.backends().into_iter().find(|b| b.service == service && b.name == name);
    ok_json(view.map(|b| backend_json(&b)).unwrap_or(Value::Null))
}

fn add_backend(service: &str, body: &str, registry: &mut Registry) -> Answer {
    let new: NewBackend = match decode(body) {
        Ok(new) => new,
        Err(a) => return a,
    };
    let parts = config::BackendParts {
        address: &new.address,
        weight: new.weight,
        name: new.name.as_deref(),
        max_conns: new.max_conns,
    };
    let spec = match parts.spec() {
        Ok(spec) => spec,
        Err(e) => return error(400, &e),
    };
    let name = spec.name.clone();
    match registry.add_backend(service, spec) {
        Ok(()) => {
            let view =
                registry.backends().into_iter().find(|b| b.service == service && b.name == name);
            Answer {
                status: 201,
                kind: "application/json",
                body: view.map(|b| backend_json(&b)).unwrap_or(Value::Null).to_string(),
            }
        }
        Err(r) => refused(r),
    }
}

/// `GET /api/sticky?client=IP[&service=S]` or `?session=HEX`: the pin of a client, or of a
/// UDP session key's bytes (hex) under `--udp-session-key`.
fn sticky(query: &str, registry: &Registry) -> Answer {
    let (mut client, mut session) = (None, None);
    let mut service = config::DEFAULT_SERVICE.to_string();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "client" => client = Some(percent_decode(v)),
            "session" => session = Some(percent_decode(v)),
            "service" => service = percent_decode(v),
            other => return error(400, &format!("unknown parameter {other:?}")),
        }
    }
    let (who, pin) =
        match (client, session) {
            (Some(client), None) => {
                let Ok(ip) = client.parse::<IpAddr>() else {
                    return error(400, &format!("client: {client:?} is not an IP address"));
                };
                (json!({ "client": ip.to_string() }), registry.sticky(&service, ip))
            }
            (None, Some(hex)) => {
                let Some(token) = from_hex(&hex) else {
                    return error(400, &format!("session: {hex:?} is not the key's bytes in hex"));
                };
                (
                    json!({ "session": hex.to_ascii_lowercase() }),
                    registry.sticky_session(&service, &token),
                )
            }
            _ => return error(
                400,
                "client (an IP address) or session (a session key's bytes in hex): one is required",
            ),
        };
    match pin {
        Ok(pin) => ok_json(json!({
            "service": service,
            "client": who.get("client"),
            "session": who.get("session"),
            "backend": pin.backend,
            "sessions": pin.live,
            "expires_in_ms": pin.expires_in_ms,
        })),
        Err(r) => refused(r),
    }
}

/// `hex` as bytes: an even count of hex digits, 1 to 64 bytes.
fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 128 {
        return None;
    }
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// Most flows `GET /api/flows` lists unless `limit` says otherwise, and the most it may ask.
const FLOWS_LIMIT: usize = 1000;
const FLOWS_LIMIT_MAX: usize = 100_000;

/// `GET /api/flows[?client=IP][&limit=N]`: the UDP flows open now, asked of each worker (which
/// reads its offloaded flows' entries first, so the counts are current).
fn flows(
    query: &str,
    links: &[(crossbeam_channel::Sender<proxy::Command>, std::sync::Arc<mio::Waker>)],
) -> Answer {
    let (mut client, mut limit) = (None, FLOWS_LIMIT);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "client" => match v.parse::<IpAddr>() {
                Ok(ip) => client = Some(ip.to_canonical()),
                Err(_) => return error(400, &format!("client: {v:?} is not an IP address")),
            },
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=FLOWS_LIMIT_MAX).contains(&n) => limit = n,
                _ => {
                    return error(
                        400,
                        &format!("limit: {v:?} is not a number from 1 to {FLOWS_LIMIT_MAX}"),
                    )
                }
            },
            other => return error(400, &format!("unknown parameter {other:?}")),
        }
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    for (worker, waker) in links {
        let _ = worker.send(proxy::Command::Flows { client, limit, reply: tx.clone() });
        let _ = waker.wake();
    }
    drop(tx);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut all = Vec::new();
    for _ in links {
        match rx.recv_deadline(deadline) {
            Ok(mine) => all.extend(mine),
            Err(_) => return error(503, "a worker did not answer within 2s"),
        }
    }
    all.sort_by_key(|f| (f.service.clone(), f.client));
    all.truncate(limit);
    ok_json(Value::Array(all.iter().map(flow_json).collect()))
}

fn flow_json(f: &proxy::FlowView) -> Value {
    json!({
        "service": f.service,
        "client": f.client.to_string(),
        "listener": f.listener.to_string(),
        "local": f.local.map(|a| a.to_string()),
        "backend": f.backend,
        "backend_address": f.backend_address.to_string(),
        "offloaded": f.offloaded,
        "keyed": f.keyed,
        "migrations": f.migrations,
        "datagrams_in": f.datagrams_in,
        "datagrams_out": f.datagrams_out,
        "bytes_in": f.bytes_in,
        "bytes_out": f.bytes_out,
        "idle_ms": f.idle_ms,
    })
}

pub(crate) fn backend_json(b: &crate::registry::BackendView) -> Value {
    json!({
        "service": b.service,
        "name": b.name,
        "address": b.address.to_string(),
        "state": b.state.as_str(),
        "health": b.health.as_str(),
        "weight": b.weight,
        "max_conns": b.max_conns,
        "sessions": b.sessions,
        "sessions_total": b.sessions_total,
        "flows": b.flows,
        "flows_total": b.flows_total,
        "sticky_clients": b.sticky_clients,
        "failures": b.failures,
        "failing": b.failing,
        "bytes_in": b.bytes_in,
        "bytes_out": b.bytes_out,
        "datagrams_in": b.datagrams_in,
        "datagrams_out": b.datagrams_out,
        "datagram_bytes_in": b.datagram_bytes_in,
        "datagram_bytes_out": b.datagram_bytes_out,
    })
}

/// `GET /api/peers`: each configured peer, as this instance sees it.
fn peers_json(registry: &Registry) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(p) = &registry.peering else { return json!([]) };
    let now = vocab::time::unix_ms(std::time::SystemTime::now());
    Value::Array(
        p.peers
            .iter()
            .map(|s| {
                let last = s.last_update_unix_ms.load(Relaxed);
                json!({
                    "name": s.name,
                    "address": s.addr.to_string(),
                    "state": s.state(),
                    "last_update_ms": (last > 0).then(|| now.saturating_sub(last)),
                    "lag_entries": s.lag_entries(),
                    "lag_ms": s.lag_ms(now),
                    "resyncs": s.resyncs.load(Relaxed),
                    "rejected": s.rejected.load(Relaxed),
                    "sent": s.sent.load(Relaxed),
                    "received": s.received.load(Relaxed),
                })
            })
            .collect(),
    )
}

/// `GET /api/status`: this process, its workers, and whether UDP flows are offloaded.
fn status_json(registry: &Registry) -> Value {
    let o = &registry.offload;
    let mut counts = proxy::Counts::default();
    for s in &registry.stats {
        counts += s.counts();
    }
    json!({
        "version": crate::version(),
        "pid": std::process::id(),
        "started_unix_ms": registry.started_unix_ms,
        "workers": registry.stats.len(),
        "name": registry.peering.as_ref().map(|p| p.name.clone()),
        "udp_offload": {
            "mode": match o.mode {
                config::UdpOffload::Auto => "auto",
                config::UdpOffload::On => "on",
                config::UdpOffload::Off => "off",
            },
            "enabled": o.enabled,
            "reason": o.reason,
            "attachment": o.attachment,
            "interfaces": o.interfaces,
            "flows_offloaded_total": counts.flows_offloaded,
            "datagrams_total": counts.offloaded_datagrams,
        },
    })
}

/// `GET /api/state`: the state file, its last save, and what came back at start.
fn state_json(registry: &Registry) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &registry.state;
    let saved = s.saved_unix_ms.load(Relaxed);
    json!({
        "file": s.file.get().map(|p| p.display().to_string()),
        "last_save_unix_ms": (saved > 0).then_some(saved),
        "last_save_duration_us": s.save_us.load(Relaxed),
        "entries": s.entries.load(Relaxed),
        "bytes": s.bytes.load(Relaxed),
        "save_errors": s.errors.load(Relaxed),
        "loaded": s.loaded.load(Relaxed),
        "skipped": s.skipped.load(Relaxed),
    })
}

fn backends_json(registry: &Registry) -> Value {
    Value::Array(registry.backends().iter().map(backend_json).collect())
}

fn events_json(registry: &Registry) -> Value {
    Value::Array(
        registry
            .events
            .iter()
            .rev()
            .map(|e| {
                let at = e.at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                json!({ "at_unix_ms": at.as_millis() as u64, "text": e.text })
            })
            .collect(),
    )
}

/// `%XX` decoding of a URL part (names such as `[::1]:5432` arrive encoded).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%5B%3A%3A1%5D%3A5432"), "[::1]:5432");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
