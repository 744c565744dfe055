//! `tether ctl`: a small client for the admin API, so nobody has to hand-write curl. Tables for
//! people by default, the API's JSON with `--json` for scripts; exit status 0 on success, 1
//! with the API's error (or why it could not be reached) on failure, 2 for a bad command line.
//!
//! One HTTP/1.0 request per command over a plain TCP connection (the admin API speaks HTTP/1
//! on loopback): no client library is needed for that, and the binary stays small.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use argh::FromArgs;
use serde_json::Value;

/// The admin address of the packaged configuration (/etc/tether/tether.toml).
const DEFAULT_ADMIN: &str = "127.0.0.1:9100";

#[derive(FromArgs, Debug)]
/// Steer a running tether through its admin API.
pub struct Ctl {
    /// admin API address (default $TETHER_ADMIN, else 127.0.0.1:9100)
    #[argh(option)]
    admin: Option<String>,
    /// file holding the admin token (--admin-token-file of the instance); needed for changes
    /// when the instance has one (default $TETHER_ADMIN_TOKEN_FILE)
    #[argh(option)]
    token_file: Option<String>,
    /// print the API's JSON instead of a table
    #[argh(switch)]
    json: bool,
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Command {
    Status(Status),
    Backends(Backends),
    Drain(Drain),
    Maint(Maint),
    Ready(Ready),
    Weight(Weight),
    Sticky(Sticky),
    Reload(Reload),
    Events(Events),
}

#[derive(FromArgs, Debug)]
/// version, pid, uptime and workers of the instance
#[argh(subcommand, name = "status")]
struct Status {}

#[derive(FromArgs, Debug)]
/// every backend: state, health, weight, sessions, flows, pinned clients, bytes
#[argh(subcommand, name = "backends")]
struct Backends {}

#[derive(FromArgs, Debug)]
/// let a backend's pinned clients and sessions run out; new clients go elsewhere
#[argh(subcommand, name = "drain")]
struct Drain {
    /// SERVICE/NAME, or NAME when only one service has a backend of that name
    #[argh(positional)]
    backend: String,
}

#[derive(FromArgs, Debug)]
/// take a backend out now: new sessions of its pinned clients go elsewhere
#[argh(subcommand, name = "maint")]
struct Maint {
    /// SERVICE/NAME, or NAME when only one service has a backend of that name
    #[argh(positional)]
    backend: String,
}

#[derive(FromArgs, Debug)]
/// put a drained or maintained backend back in service
#[argh(subcommand, name = "ready")]
struct Ready {
    /// SERVICE/NAME, or NAME when only one service has a backend of that name
    #[argh(positional)]
    backend: String,
}

#[derive(FromArgs, Debug)]
/// set a backend's weight (1..=1000)
#[argh(subcommand, name = "weight")]
struct Weight {
    /// SERVICE/NAME, or NAME when only one service has a backend of that name
    #[argh(positional)]
    backend: String,
    /// the new weight
    #[argh(positional)]
    weight: u32,
}

#[derive(FromArgs, Debug)]
/// which backend a client (or a UDP session key) is pinned to, its open sessions and flows,
/// and when the pin expires
#[argh(subcommand, name = "sticky")]
struct Sticky {
    /// the client's IP address
    #[argh(positional)]
    client: Option<String>,
    /// instead of a client: a UDP session key's bytes in hex (--udp-session-key)
    #[argh(option)]
    session: Option<String>,
    /// the service (default: `default`, the service of flag-configured instances)
    #[argh(option)]
    service: Option<String>,
}

#[derive(FromArgs, Debug)]
/// read the configuration file again and apply it, all or nothing
#[argh(subcommand, name = "reload")]
struct Reload {}

#[derive(FromArgs, Debug)]
/// the recent events, newest first
#[argh(subcommand, name = "events")]
struct Events {}

/// A failure to report: the message, and whether the command line was at fault (exit 2).
struct Failure(String, u8);

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure(s, 1)
    }
}

/// `tether ctl ARGS...` (the words after `ctl`).
pub fn main(args: &[&str]) -> ExitCode {
    let ctl = match Ctl::from_args(&["tether ctl"], args) {
        Ok(ctl) => ctl,
        Err(early) if early.status.is_ok() => {
            print!("{}", early.output);
            return ExitCode::SUCCESS;
        }
        Err(early) => {
            eprintln!("tether ctl: {}", early.output.trim());
            return ExitCode::from(2);
        }
    };
    match run(&ctl) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(Failure(message, code)) => {
            eprintln!("tether ctl: {message}");
            ExitCode::from(code)
        }
    }
}

fn run(ctl: &Ctl) -> Result<String, Failure> {
    let admin_text = ctl
        .admin
        .clone()
        .or_else(|| std::env::var("TETHER_ADMIN").ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| DEFAULT_ADMIN.into());
    let admin = resolve(&admin_text).map_err(|e| Failure(e, 2))?;
    let token = read_token(ctl.token_file.clone())?;
    let api = Api { addr: admin, shown: admin_text, token };
    let json = ctl.json;
    match &ctl.command {
        Command::Status(_) => {
            let v = api.call("GET", "/api/status", "")?;
            Ok(if json { pretty(&v) } else { status_table(&v) })
        }
        Command::Backends(_) => {
            let v = api.call("GET", "/api/backends", "")?;
            Ok(if json { pretty(&v) } else { backends_table(&v) })
        }
        Command::Drain(Drain { backend }) => set_state(&api, backend, "drain", json),
        Command::Maint(Maint { backend }) => set_state(&api, backend, "maint", json),
        Command::Ready(Ready { backend }) => set_state(&api, backend, "ready", json),
        Command::Weight(Weight { backend, weight }) => {
            let (service, name) = api.backend(backend)?;
            let v = api.call(
                "PUT",
                &backend_path(&service, &name),
                &format!("{{\"weight\":{weight}}}"),
            )?;
            Ok(if json {
                pretty(&v)
            } else {
                format!("{service}/{name}: weight {}\n", text(&v["weight"]))
            })
        }
        Command::Sticky(Sticky { client, session, service }) => {
            let service = service.as_deref().unwrap_or("default");
            let who = match (client, session) {
                (Some(client), None) => format!("client={}", encode(client)),
                (None, Some(hex)) => format!("session={}", encode(hex)),
                _ => {
                    let usage = "sticky: give a client's IP address or --session HEX, not both";
                    return Err(Failure(usage.into(), 2));
                }
            };
            let path = format!("/api/sticky?{who}&service={}", encode(service));
            let v = api.call("GET", &path, "")?;
            Ok(if json {
                pretty(&v)
            } else {
                let who = match &v["session"] {
                    Value::String(hex) => format!("session key {hex}"),
                    _ => text(&v["client"]),
                };
                format!(
                    "{} is pinned to {}/{}: {} open sessions, the pin expires in {}\n",
                    who,
                    text(&v["service"]),
                    text(&v["backend"]),
                    text(&v["sessions"]),
                    duration_ms(v["expires_in_ms"].as_u64()),
                )
            })
        }
        Command::Reload(_) => {
            let v = api.call("POST", "/api/reload", "")?;
            Ok(if json { pretty(&v) } else { format!("reloaded: {}\n", text(&v["reloaded"])) })
        }
        Command::Events(_) => {
            let v = api.call("GET", "/api/events", "")?;
            Ok(if json { pretty(&v) } else { events_list(&v) })
        }
    }
}

fn set_state(api: &Api, backend: &str, state: &str, json: bool) -> Result<String, Failure> {
    let (service, name) = api.backend(backend)?;
    let v =
        api.call("PUT", &backend_path(&service, &name), &format!("{{\"state\":\"{state}\"}}"))?;
    Ok(if json {
        pretty(&v)
    } else {
        // The answer is the backend as it is now.
        format!(
            "{service}/{name}: {} (health {}, {} sessions, {} pinned clients)\n",
            text(&v["state"]),
            text(&v["health"]),
            text(&v["sessions"]),
            text(&v["sticky_clients"])
        )
    })
}

/// The admin API at one address.
struct Api {
    addr: SocketAddr,
    /// The address as the operator wrote it, for messages.
    shown: String,
    token: Option<String>,
}

impl Api {
    /// One request; the parsed JSON of a 2xx answer, or the API's error.
    fn call(&self, method: &str, path: &str, body: &str) -> Result<Value, Failure> {
        let (status, reply) = request(self.addr, method, path, body, self.token.as_deref())
            .map_err(|e| format!("the admin API at {}: {e}", self.shown))?;
        let parsed: Value = serde_json::from_str(&reply).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            let message =
                parsed["error"].as_str().map_or_else(|| reply.trim().to_string(), str::to_string);
            let hint = if status == 401 && self.token.is_none() {
                " (this instance needs its admin token: --token-file FILE)"
            } else {
                ""
            };
            return Err(format!("{method} {path}: {status}: {message}{hint}").into());
        }
        if parsed.is_null() {
            return Err(format!("{method} {path}: the answer is not JSON: {reply:?}").into());
        }
        Ok(parsed)
    }

    /// `SERVICE/NAME` as given, or `NAME` looked up among every service's backends.
    fn backend(&self, given: &str) -> Result<(String, String), Failure> {
        if let Some((service, name)) = given.split_once('/') {
            if service.is_empty() || name.is_empty() {
                return Err(Failure(format!("{given:?}: write SERVICE/NAME or NAME"), 2));
            }
            return Ok((service.to_string(), name.to_string()));
        }
        let all = self.call("GET", "/api/backends", "")?;
        let services: Vec<String> = all
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["name"].as_str() == Some(given))
            .filter_map(|b| b["service"].as_str().map(str::to_string))
            .collect();
        match services.as_slice() {
            [one] => Ok((one.clone(), given.to_string())),
            [] => {
                Err(format!("no backend named {given:?} (tether ctl backends lists them)").into())
            }
            many => Err(format!(
                "{given:?} is a backend of services {}: write SERVICE/{given}",
                many.join(", ")
            )
            .into()),
        }
    }
}

fn backend_path(service: &str, name: &str) -> String {
    format!("/api/services/{}/backends/{}", encode(service), encode(name))
}

/// An address as `host:port`; a name is resolved (the first address).
fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .map_err(|e| format!("--admin {text:?}: {e} (write HOST:PORT, e.g. 127.0.0.1:9100)"))?
        .next()
        .ok_or_else(|| format!("--admin {text:?}: no address"))
}

/// `tether check --config FILE --admin ADDR`: what reloading FILE would do to the instance at
/// ADDR (`POST /api/reload?dry_run=1`), printed; exit 1 when it cannot be asked.
pub fn reload_preview(admin: &str, file: &std::path::Path) -> ExitCode {
    let run = || -> Result<String, Failure> {
        let body = std::fs::read_to_string(file)
            .map_err(|e| Failure(format!("{}: {e}", file.display()), 2))?;
        let addr = resolve(admin).map_err(|e| Failure(e, 2))?;
        let token = read_token(None)?;
        let api = Api { addr, shown: admin.to_string(), token };
        let v = api.call("POST", "/api/reload?dry_run=1", &body)?;
        let mut out = format!(
            "against {admin}: reloading it would move {} pinned clients and cut {} sessions\n",
            text(&v["pinned_clients_moving"]),
            text(&v["sessions_cut"])
        );
        for s in v["services"].as_array().into_iter().flatten() {
            let movers: Vec<String> = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["pinned_clients_moving"].as_u64().unwrap_or(0) > 0)
                .map(|b| format!("{} {}", text(&b["name"]), text(&b["pinned_clients_moving"])))
                .collect();
            out += &format!(
                "  {}: {} pinned clients moving{}, {} sessions cut, {:.1}% of the table's slots change owner{}\n",
                text(&s["service"]),
                text(&s["pinned_clients_moving"]),
                if movers.is_empty() { String::new() } else { format!(" ({})", movers.join(", ")) },
                text(&s["sessions_cut"]),
                s["slots_changing"].as_f64().unwrap_or(0.0) * 100.0,
                if s["removed"] == true { "; the service is removed" } else { "" },
            );
        }
        for added in v["services_added"].as_array().into_iter().flatten() {
            out += &format!("  {}: a new service\n", text(added));
        }
        Ok(out)
    };
    match run() {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(Failure(message, code)) => {
            eprintln!("tether check: {message}");
            ExitCode::from(code)
        }
    }
}

/// The admin token from `given` (`--token-file`), else `$TETHER_ADMIN_TOKEN_FILE`, if either.
fn read_token(given: Option<String>) -> Result<Option<String>, Failure> {
    let from_env = || std::env::var("TETHER_ADMIN_TOKEN_FILE").ok().filter(|v| !v.is_empty());
    let Some(path) = given.or_else(from_env) else { return Ok(None) };
    let token = std::fs::read_to_string(&path)
        .map_err(|e| Failure(format!("token file {path}: {e}"), 2))?;
    Ok(Some(token.trim().to_string()))
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One HTTP/1.0 request: the status and the body. An upgrade may take a minute to answer.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(75)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = || std::io::Error::other(format!("not an HTTP answer: {:?}", truncate(&text, 200)));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// A JSON value as a table cell: strings bare, null as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Rows under a header, each column as wide as its widest cell; numbers right-aligned.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..header.len())
        .map(|i| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| r.get(i).is_some_and(|c| c.parse::<f64>().is_ok() || c == "-"))
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut out: Vec<String> = Vec::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(cell.chars().count());
            out.push(if numeric[i] {
                format!("{}{cell}", " ".repeat(pad))
            } else {
                format!("{cell}{}", " ".repeat(pad))
            });
        }
        out.join("  ").trim_end().to_string() + "\n"
    };
    let mut s = line(header.to_vec());
    for row in rows {
        s += &line(row.iter().map(String::as_str).collect());
    }
    s
}

fn backends_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            vec![
                text(&b["service"]),
                text(&b["name"]),
                text(&b["address"]),
                text(&b["state"]),
                text(&b["health"]),
                text(&b["weight"]),
                text(&b["sessions"]),
                text(&b["flows"]),
                text(&b["sticky_clients"]),
                bytes(b["bytes_in"].as_u64()),
                bytes(b["bytes_out"].as_u64()),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no backends\n".into();
    }
    table(
        &[
            "SERVICE", "BACKEND", "ADDRESS", "STATE", "HEALTH", "WEIGHT", "SESSIONS", "FLOWS",
            "PINNED", "IN", "OUT",
        ],
        &rows,
    )
}

fn status_table(v: &Value) -> String {
    let now_ms = vocab::time::unix_ms(SystemTime::now());
    let up = v["started_unix_ms"].as_u64().map(|s| now_ms.saturating_sub(s));
    let offload = &v["udp_offload"];
    let mut rows = vec![
        ("version", text(&v["version"])),
        ("pid", text(&v["pid"])),
        ("up", duration_ms(up)),
        ("workers", text(&v["workers"])),
    ];
    if !v["name"].is_null() {
        rows.push(("name", text(&v["name"])));
    }
    rows.push((
        "udp offload",
        format!(
            "{} ({})",
            if offload["enabled"].as_bool() == Some(true) { "on" } else { "off" },
            text(&offload["reason"])
        ),
    ));
    rows.iter().map(|(k, v)| format!("{k:<12} {v}\n")).collect()
}

fn events_list(v: &Value) -> String {
    let lines: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| format!("{}  {}\n", clock(e["at_unix_ms"].as_u64()), text(&e["text"])))
        .collect();
    if lines.is_empty() {
        "no events\n".into()
    } else {
        lines.concat()
    }
}

/// A UTC time with milliseconds, from Unix milliseconds.
fn clock(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".into(), |ms| vocab::time::rfc3339_from_unix_ms(ms).replace('T', " "))
}

fn duration_ms(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let s = ms / 1000;
    match s {
        0 => format!("{ms} ms"),
        1..=59 => format!("{s} s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

fn bytes(n: Option<u64>) -> String {
    let Some(n) = n else { return "-".into() };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_pads_columns_and_right_aligns_numbers() {
        let t = table(
            &["NAME", "SESSIONS"],
            &[vec!["b1".into(), "7".into()], vec!["backend-2".into(), "1234".into()]],
        );
        assert_eq!(t, "NAME       SESSIONS\nb1                7\nbackend-2      1234\n");
    }

    #[test]
    fn names_are_percent_encoded_and_times_are_utc() {
        assert_eq!(encode("[::1]:5432"), "%5B%3A%3A1%5D%3A5432");
        assert_eq!(encode("b-1_x.y~"), "b-1_x.y~");
        assert_eq!(clock(Some(1_795_986_812_345)), "2026-11-29 21:13:32.345Z");
        assert_eq!(bytes(Some(1536)), "1.5 KiB");
        assert_eq!(duration_ms(Some(3_725_000)), "1h02m");
    }
}
