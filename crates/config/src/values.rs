//! One value each: parse or check the text of a single setting (an address, a weight, a
//! duration, a backend, a user...). Errors say what is wrong with the value only; the caller
//! (the flags or the config file) adds where it was.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use crate::*;

/// Admin connections at once: 1..=10,000.
pub fn parse_admin_conns(raw: &str) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(n) if (1..=MAX_ADMIN_CONNS).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {MAX_ADMIN_CONNS}")),
    }
}

/// Most consecutive results `rise`/`fall` may ask for.
pub const MAX_HEALTH_COUNT: u32 = 100;

/// Who to run as after binding: a user name and, optionally, a group name (else the user's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: String,
    pub group: Option<String>,
}

/// `NAME` or `NAME:GROUP`, names as useradd(8) allows them.
pub fn parse_user(raw: &str) -> Result<UserSpec, String> {
    let (user, group) = match raw.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (raw, None),
    };
    let ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 32
            && !n.starts_with('-')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    if !ok(user) || !group.map_or(true, ok) {
        return Err("expected NAME or NAME:GROUP (letters, digits, . _ -)".into());
    }
    Ok(UserSpec { user: user.to_string(), group: group.map(str::to_string) })
}

/// A rise/fall count: 1..=100.
pub fn parse_small(raw: &str) -> Result<u32, String> {
    match raw.parse::<u32>() {
        Ok(n) if (1..=MAX_HEALTH_COUNT).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {MAX_HEALTH_COUNT}")),
    }
}

/// Decide the probe from the `health-check` setting, the UDP payloads and the protocol.
/// Errors carry the setting's name (`health-check`, `health-send`) and the problem.
pub fn health_check(
    check: Option<&str>,
    send: Option<Vec<u8>>,
    expect: Option<Vec<u8>>,
    protocol: Protocol,
) -> Result<HealthCheck, (&'static str, String)> {
    let udp = |send: Option<Vec<u8>>, expect: Option<Vec<u8>>| match send {
        Some(send) => Ok(HealthCheck::Udp { send, expect: expect.unwrap_or_default() }),
        None => Err(("health-send", "a UDP probe needs a payload to send".to_string())),
    };
    match check {
        None if send.is_some() => udp(send, expect),
        None if protocol.tcp() => Ok(HealthCheck::Tcp),
        None => Ok(HealthCheck::Off),
        Some("udp") => udp(send, expect),
        Some(other) if send.is_some() || expect.is_some() => {
            Err(("health-send", format!("only a `udp` probe sends a payload, not `{other}`")))
        }
        Some("tcp") => Ok(HealthCheck::Tcp),
        Some("off") => Ok(HealthCheck::Off),
        Some(_) => Err(("health-check", "expected `tcp`, `udp` or `off`".to_string())),
    }
}

/// Bytes from text with `\xNN` escapes (and `\\`, `\n`, `\r`, `\0`).
pub fn unescape(raw: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'\\') => out.push(b'\\'),
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b'0') => out.push(0),
            Some(b'x') => {
                let hex = raw.get(i + 2..i + 4).ok_or("\\x needs two hex digits")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| "\\x needs two hex digits")?);
                i += 2;
            }
            _ => return Err("unknown escape (use \\xNN, \\\\, \\n, \\r or \\0)".into()),
        }
        i += 2;
    }
    if out.len() > 1024 {
        return Err("at most 1024 bytes".into());
    }
    Ok(out)
}

/// The admin address: loopback only unless `allow_remote`.
pub fn check_admin(raw: &str, allow_remote: bool) -> Result<SocketAddr, String> {
    let addr = parse_addr(raw)?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err("not a loopback address: the admin interface can steer every backend; \
                    pass --admin-allow-remote (key `admin-allow-remote`) to expose it"
            .into());
    }
    Ok(addr)
}

/// `source`, `source/V4` or `source/V4,V6` (prefix lengths), or `5tuple`.
pub fn parse_affinity(raw: &str) -> Result<(Affinity, vocab::Prefix), String> {
    let bad = || "expected `source`, `source/24`, `source/24,64` or `5tuple`".to_string();
    match raw {
        "source" => return Ok((Affinity::Source, vocab::Prefix::HOST)),
        "5tuple" => return Ok((Affinity::FiveTuple, vocab::Prefix::HOST)),
        _ => {}
    }
    let lengths = raw.strip_prefix("source/").ok_or_else(bad)?;
    let (v4, v6) = match lengths.split_once(',') {
        Some((a, b)) => (a, Some(b)),
        None => (lengths, None),
    };
    let v4: u8 = v4.parse().map_err(|_| bad())?;
    if !(1..=32).contains(&v4) {
        return Err(format!("an IPv4 prefix length is 1 to 32, not {v4}"));
    }
    let v6: u8 = match v6 {
        Some(b) => b.parse().map_err(|_| bad())?,
        None => 128,
    };
    if !(1..=128).contains(&v6) {
        return Err(format!("an IPv6 prefix length is 1 to 128, not {v6}"));
    }
    Ok((Affinity::Source, vocab::Prefix { v4, v6 }))
}

pub fn parse_protocol(raw: &str) -> Result<Protocol, String> {
    match raw {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "both" => Ok(Protocol::Both),
        _ => Err("expected `tcp`, `udp` or `both`".into()),
    }
}

pub fn parse_splice(raw: &str) -> Result<Splice, String> {
    match raw {
        "auto" => Ok(Splice::Auto),
        "off" => Ok(Splice::Off),
        _ => Err("expected `auto` or `off`".into()),
    }
}

pub fn parse_udp_offload(raw: &str) -> Result<UdpOffload, String> {
    match raw {
        "auto" => Ok(UdpOffload::Auto),
        "on" => Ok(UdpOffload::On),
        "off" => Ok(UdpOffload::Off),
        _ => Err("expected `auto`, `on` or `off`".into()),
    }
}

pub fn parse_listeners(raw: &str) -> Result<Listeners, String> {
    match raw {
        "shared" => Ok(Listeners::Shared),
        "per-worker" => Ok(Listeners::PerWorker),
        _ => Err("expected `shared` or `per-worker`".into()),
    }
}

/// A Maglev table size: prime and larger than the pool.
pub fn check_table_size(size: usize, backends: usize) -> Result<(), String> {
    if !is_prime(size) {
        return Err("must be a prime number".into());
    }
    if size <= backends {
        return Err("must be larger than the number of backends".into());
    }
    Ok(())
}

/// A duration setting: parsed, more than zero, at most a year.
pub fn check_duration(raw: &str) -> Result<Duration, String> {
    let d = parse_duration(raw)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    if d > MAX_DURATION {
        return Err("must be at most a year (8760h)".into());
    }
    Ok(d)
}

/// A service or backend name: 1 to 128 of letters, digits and `-_.:[]`.
pub fn check_name(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 128 {
        return Err("name must be 1 to 128 characters".into());
    }
    if !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:[]".contains(c)) {
        return Err(format!("name {v:?} may only hold letters, digits and -_.:[]"));
    }
    Ok(())
}

/// Parse `ADDR[,weight=N][,name=NAME]`.
pub fn parse_backend(raw: &str) -> Result<BackendSpec, String> {
    let mut parts = raw.split(',');
    let address = parts.next().unwrap_or_default();
    let mut given = BackendParts { address, ..BackendParts::default() };
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("expected key=value after the address, got {part:?}"))?;
        let number = |what: &str| {
            v.parse::<i64>().map_err(|_| format!("{what} {v:?} is not a whole number"))
        };
        match k {
            "weight" => given.weight = Some(number("weight")?),
            "name" => given.name = Some(v),
            "max-conns" => given.max_conns = Some(number("max-conns")?),
            other => {
                return Err(format!(
                    "unknown backend option {other:?} (expected weight, name or max-conns)"
                ))
            }
        }
    }
    given.spec()
}

/// A backend as given, before validation: by `--backend`'s options, or by the admin API's JSON.
#[derive(Debug, Default, Clone, Copy)]
pub struct BackendParts<'a> {
    pub address: &'a str,
    pub weight: Option<i64>,
    pub name: Option<&'a str>,
    pub max_conns: Option<i64>,
}

impl BackendParts<'_> {
    /// The backend, every part checked the one way every form of input is.
    pub fn spec(&self) -> Result<BackendSpec, String> {
        let addr = check_backend_addr(self.address)?;
        let weight = match self.weight {
            Some(w) => Some(check_weight(w).map_err(|p| format!("weight {w} {p}"))?),
            None => None,
        };
        if let Some(name) = self.name {
            check_name(name)?;
        }
        let max_conns = match self.max_conns {
            Some(n) => Some(check_backend_max_conns(n).map_err(|p| format!("max-conns {p}"))?),
            None => None,
        };
        let mut spec = backend_spec(addr, weight, self.name.map(str::to_string));
        spec.max_conns = max_conns;
        Ok(spec)
    }
}

/// A backend's `max-conns`: 1..=1,000,000.
pub fn check_backend_max_conns(n: i64) -> Result<NonZeroU32, String> {
    u32::try_from(n)
        .ok()
        .filter(|n| (1..=1_000_000).contains(n))
        .and_then(NonZeroU32::new)
        .ok_or_else(|| format!("{n} out of range 1..=1000000"))
}

/// A backend from its parts, defaulting the weight to 1 and the name to the address.
pub(crate) fn backend_spec(
    addr: SocketAddr,
    weight: Option<NonZeroU32>,
    name: Option<String>,
) -> BackendSpec {
    BackendSpec {
        addr,
        name: name.unwrap_or_else(|| addr.to_string()),
        weight: weight.unwrap_or(NonZeroU32::MIN),
        max_conns: None,
    }
}

/// A backend address: `IP:port` with a port other than 0.
pub fn check_backend_addr(raw: &str) -> Result<SocketAddr, String> {
    let addr = parse_addr(raw)?;
    if addr.port() == 0 {
        return Err("backend port must not be 0".into());
    }
    Ok(addr)
}

/// A backend weight: 1..=1000. Signed, so that a negative weight in the file is out of range
/// rather than a type error.
pub fn check_weight(w: i64) -> Result<NonZeroU32, String> {
    u32::try_from(w)
        .ok()
        .filter(|w| (1..=MAX_WEIGHT).contains(w))
        .and_then(NonZeroU32::new)
        .ok_or_else(|| format!("out of range 1..={MAX_WEIGHT}"))
}

pub fn parse_addr(raw: &str) -> Result<SocketAddr, String> {
    raw.parse::<SocketAddr>()
        .map_err(|_| "not an IP:port address (IPv6 goes in brackets: [::1]:5432)".to_string())
}

/// A Maglev seed: any unsigned 64-bit integer.
pub fn parse_seed(raw: &str) -> Result<u64, String> {
    raw.parse().map_err(|_| "expected an unsigned 64-bit integer".to_string())
}

/// A count that must be positive (workers, connection and flow limits, sticky capacity).
pub fn parse_count(raw: &str) -> Result<NonZeroUsize, String> {
    let n: usize = raw.parse().map_err(|_| "expected a whole number greater than zero")?;
    NonZeroUsize::new(n).ok_or_else(|| "must be greater than zero".to_string())
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2;
    while i * i <= n {
        if n % i == 0 {
            return false;
        }
        i += 1;
    }
    true
}
