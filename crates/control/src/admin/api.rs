//! The admin API's endpoints, behind the server in `super`: a request's method, path, query and
//! body in, an [`Answer`] out. Runs on a blocking thread; takes the registry lock as it needs.

use std::net::IpAddr;
use std::sync::Mutex;

use hyper::Method;
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
        (&Method::GET, ["api", "sticky"]) => sticky(query, &lock()),
        (&Method::PUT, ["api", "services", service, "backends", name]) => {
            change_backend(service, name, body, &mut lock())
        }
        (&Method::DELETE, ["api", "services", service, "backends", name]) => {
            match lock().remove_backend(service, name) {
                Ok(()) => ok_json(json!({ "removed": name })),
                Err(r) => refused(r),
            }
        }
        (&Method::POST, ["api", "services", service, "backends"]) => {
            add_backend(service, body, &mut lock())
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
        (_, [] | ["metrics"] | ["api", "backends" | "events" | "sticky" | "reload"])
        | (_, ["api", "services", _, "backends", ..]) => {
            error(405, &format!("{method} is not allowed on /{}", segments.join("/")))
        }
        _ => error(404, &format!("no such endpoint: /{}", segments.join("/"))),
    }
}

fn parse_object(body: &str) -> Result<serde_json::Map<String, Value>, Answer> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(error(400, "the body must be a JSON object")),
        Err(e) => Err(error(400, &format!("the body is not JSON: {e}"))),
    }
}

fn change_backend(service: &str, name: &str, body: &str, registry: &mut Registry) -> Answer {
    let map = match parse_object(body) {
        Ok(map) => map,
        Err(a) => return a,
    };
    // Check everything before changing anything.
    let mut state = None;
    let mut weight = None;
    for (k, v) in &map {
        match (k.as_str(), v) {
            ("state", Value::String(s)) => match s.parse::<health::AdminState>() {
                Ok(s) => state = Some(s),
                Err(e) => return error(400, &format!("state: {e}")),
            },
            ("weight", Value::Number(n)) => match n.as_u64() {
                Some(w @ 1..=1000) => weight = Some(w as u32),
                _ => return error(400, &format!("weight: {n} out of range 1..=1000")),
            },
            ("state", _) => return error(400, "state: expected a string"),
            ("weight", _) => return error(400, "weight: expected a whole number"),
            (other, _) => {
                return error(400, &format!("unknown key {other:?} (expected state or weight)"))
            }
        }
    }
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
    let map = match parse_object(body) {
        Ok(map) => map,
        Err(a) => return a,
    };
    let mut spec = String::new();
    let mut address = None;
    for (k, v) in &map {
        match (k.as_str(), v) {
            ("address", Value::String(a)) => address = Some(a.clone()),
            ("weight", Value::Number(n)) => spec.push_str(&format!(",weight={n}")),
            ("name", Value::String(n)) => spec.push_str(&format!(",name={n}")),
            ("max_conns", Value::Number(n)) => spec.push_str(&format!(",max-conns={n}")),
            ("max_conns", _) => return error(400, "max_conns: expected a whole number"),
            ("address" | "name", _) => return error(400, &format!("{k}: expected a string")),
            ("weight", _) => return error(400, "weight: expected a whole number"),
            (other, _) => {
                return error(
                    400,
                    &format!("unknown key {other:?} (expected address, weight, name or max_conns)"),
                )
            }
        }
    }
    let Some(address) = address else { return error(400, "address: required") };
    // The parts are joined into the flag form: a comma inside one would smuggle in an option.
    let commas = map.values().filter_map(Value::as_str).any(|v| v.contains(','));
    if commas || address.contains(',') {
        return error(400, "address and name may not contain a comma");
    }
    let spec = match config::parse_backend(&format!("{address}{spec}")) {
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

fn sticky(query: &str, registry: &Registry) -> Answer {
    let mut client = None;
    let mut service = config::DEFAULT_SERVICE.to_string();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "client" => client = Some(percent_decode(v)),
            "service" => service = percent_decode(v),
            other => return error(400, &format!("unknown parameter {other:?}")),
        }
    }
    let Some(client) = client else { return error(400, "client: required (an IP address)") };
    let Ok(ip) = client.parse::<IpAddr>() else {
        return error(400, &format!("client: {client:?} is not an IP address"));
    };
    match registry.sticky(&service, ip) {
        Ok(pin) => ok_json(json!({
            "service": service,
            "client": ip.to_string(),
            "backend": pin.backend,
            "sessions": pin.live,
            "expires_in_ms": pin.expires_in_ms,
        })),
        Err(r) => refused(r),
    }
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
        "bytes_in": b.bytes_in,
        "bytes_out": b.bytes_out,
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
