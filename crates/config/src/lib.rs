//! Configuration: command-line flags -> one validated [`Config`].
//!
//! This layer parses and validates; it opens no socket and reads no file besides what it is
//! handed. Raw flags ([`Args`], parsed by argh) are converted by `TryFrom` into types that cannot
//! hold a bad value (`NonZeroU32` weights, `Duration`s, `SocketAddr`s). Every error names the
//! flag and the problem, on one line.
//!
//! ```
//! use tether_config::{Args, Config};
//! use argh::FromArgs;
//!
//! let args = Args::from_args(
//!     &["tether"],
//!     &["--listen", "127.0.0.1:5432", "--backend", "10.0.0.1:5432,weight=2", "--backend", "10.0.0.2:5432"],
//! )
//! .unwrap();
//! let config = Config::try_from(args).unwrap();
//! assert_eq!(config.backends[0].weight.get(), 2);
//! assert_eq!(config.backends[1].name, "10.0.0.2:5432");
//! ```
//!
//! The defaults are named constants below; docs/configuration.md says why each was chosen.

#![forbid(unsafe_code)]

mod duration;

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use argh::FromArgs;

pub use duration::{format_duration, parse_duration};

/// How long a client stays pinned after its last session ends. Database clients reconnect after
/// pool recycling and game clients after short drops; half an hour covers both.
pub const DEFAULT_STICKY_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Sticky entries kept at most (about 70 MB at the limit; see docs/performance.md).
pub const DEFAULT_STICKY_CAPACITY: usize = 1_000_000;
/// A backend that has not completed the TCP handshake by then is treated as failed and the next
/// backend is tried. HAProxy's common `timeout connect 5s`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A session with no byte moving either way for this long is closed. Connection pools keep idle
/// database connections for long periods; an hour closes only the truly abandoned ones.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// On SIGTERM/SIGINT open sessions get this long to finish before the process exits.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Maglev table size (prime, NSDI 2016 section 3.4 suggests M >> number of backends).
pub const DEFAULT_TABLE_SIZE: usize = 65_537;
/// How long a UDP flow lives without a datagram either way. Game clients send several
/// datagrams a second; a minute outlasts any pause short of a disconnect, the way NATs do.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest duration accepted anywhere: a year is already "never" for a proxy timer, and a bound
/// keeps deadline arithmetic far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Highest backend weight accepted.
pub const MAX_WEIGHT: u32 = 1000;

/// tether: an L4 TCP load balancer that pins each client to one backend.
#[derive(FromArgs, Debug, Default)]
pub struct Args {
    /// address to accept clients on, e.g. 0.0.0.0:5432 or [::]:5432 (repeatable)
    #[argh(option)]
    pub listen: Vec<String>,
    /// backend ADDR[,weight=N][,name=NAME]; weight 1..=1000 (default 1), name defaults to ADDR
    /// (repeatable)
    #[argh(option)]
    pub backend: Vec<String>,
    /// what pins a client: `source` (client IP, default) or `5tuple` (each connection on its own)
    #[argh(option)]
    pub affinity: Option<String>,
    /// how long a client stays pinned after its last session closes (default 30m)
    #[argh(option)]
    pub sticky_timeout: Option<String>,
    /// most sticky entries kept; new clients past it are served unpinned (default 1000000)
    #[argh(option)]
    pub sticky_capacity: Option<String>,
    /// backend connect timeout before the next backend is tried (default 5s)
    #[argh(option)]
    pub connect_timeout: Option<String>,
    /// close a session after this long without traffic either way (default 1h)
    #[argh(option)]
    pub idle_timeout: Option<String>,
    /// worker threads, one event loop each (default: one per CPU available to the process)
    #[argh(option)]
    pub workers: Option<String>,
    /// most concurrent sessions; further clients are refused (default: from the fd limit)
    #[argh(option)]
    pub max_conns: Option<String>,
    /// byte pump: `auto` (splice(2) through pipes where available) or `off` (userspace copy)
    #[argh(option)]
    pub splice: Option<String>,
    /// on SIGTERM/SIGINT, how long open sessions may run before exit (default 30s)
    #[argh(option)]
    pub grace: Option<String>,
    /// seed of the Maglev table: processes with the same seed and pool agree on every client (default 0)
    #[argh(option)]
    pub seed: Option<String>,
    /// size of the Maglev table, a prime larger than the backend count (default 65537)
    #[argh(option)]
    pub table_size: Option<String>,
    /// listeners given by --listen take `tcp` (default), `udp` or `both`
    #[argh(option)]
    pub protocol: Option<String>,
    /// how long a UDP flow lives without a datagram either way (default 1m)
    #[argh(option)]
    pub udp_idle_timeout: Option<String>,
    /// most UDP flows open at once across all workers; new flows past it are dropped
    /// (default: from the fd limit, at most 65536)
    #[argh(option)]
    pub max_flows: Option<String>,
    /// benchmark aid: start with N idle sticky entries for documentation addresses
    /// (2001:db8::/32) to measure tether with a large table (default 0)
    #[argh(option)]
    pub sticky_prefill: Option<String>,
}

/// What a client is pinned by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// Every connection of one client IP goes to one backend (sticky table).
    Source,
    /// Each connection is hashed on its own 5-tuple; no sticky entry.
    FiveTuple,
}

/// Which transports the listeners given by flags take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Both,
}

impl Protocol {
    pub fn tcp(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Both)
    }

    pub fn udp(self) -> bool {
        matches!(self, Protocol::Udp | Protocol::Both)
    }
}

/// Which byte pump sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splice {
    /// `splice(2)` through a pipe per direction where the kernel supports it.
    Auto,
    /// Userspace buffers only.
    Off,
}

/// One backend as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub name: String,
    pub weight: NonZeroU32,
}

/// A validated configuration: every field holds a usable value.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub protocol: Protocol,
    pub backends: Vec<BackendSpec>,
    pub affinity: Affinity,
    pub sticky_timeout: Duration,
    pub sticky_capacity: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None`: one per CPU, decided at start.
    pub workers: Option<NonZeroUsize>,
    /// `None`: derived from the file-descriptor limit at start.
    pub max_conns: Option<NonZeroUsize>,
    pub splice: Splice,
    pub grace: Duration,
    pub seed: u64,
    pub table_size: usize,
    /// Idle sticky entries inserted at start (benchmarks only).
    pub sticky_prefill: usize,
    pub udp_idle_timeout: Duration,
    /// `None`: derived from the file-descriptor limit at start.
    pub max_flows: Option<NonZeroUsize>,
}

/// A flag that could not be accepted: which flag, the value given, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub flag: &'static str,
    pub value: Option<String>,
    pub problem: String,
}

impl ConfigError {
    fn new(flag: &'static str, value: &str, problem: impl Into<String>) -> Self {
        ConfigError { flag, value: Some(value.to_string()), problem: problem.into() }
    }

    fn missing(flag: &'static str, problem: impl Into<String>) -> Self {
        ConfigError { flag, value: None, problem: problem.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "--{} {:?}: {}", self.flag, v, self.problem),
            None => write!(f, "--{}: {}", self.flag, self.problem),
        }
    }
}

impl std::error::Error for ConfigError {}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        if args.listen.is_empty() {
            return Err(ConfigError::missing("listen", "at least one listen address is required"));
        }
        let mut listen = Vec::with_capacity(args.listen.len());
        for raw in &args.listen {
            let addr = parse_addr(raw).map_err(|p| ConfigError::new("listen", raw, p))?;
            if listen.contains(&addr) {
                return Err(ConfigError::new("listen", raw, "given twice"));
            }
            listen.push(addr);
        }
        if args.backend.is_empty() {
            return Err(ConfigError::missing("backend", "at least one backend is required"));
        }
        let mut backends: Vec<BackendSpec> = Vec::with_capacity(args.backend.len());
        for raw in &args.backend {
            let spec = parse_backend(raw).map_err(|p| ConfigError::new("backend", raw, p))?;
            if backends.iter().any(|b| b.name == spec.name) {
                let problem = format!("backend name {:?} is used twice", spec.name);
                return Err(ConfigError::new("backend", raw, problem));
            }
            backends.push(spec);
        }
        let affinity = match args.affinity.as_deref() {
            None | Some("source") => Affinity::Source,
            Some("5tuple") => Affinity::FiveTuple,
            Some(other) => {
                return Err(ConfigError::new("affinity", other, "expected `source` or `5tuple`"))
            }
        };
        let protocol = match args.protocol.as_deref() {
            None | Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some("both") => Protocol::Both,
            Some(other) => {
                return Err(ConfigError::new("protocol", other, "expected `tcp`, `udp` or `both`"))
            }
        };
        let splice = match args.splice.as_deref() {
            None | Some("auto") => Splice::Auto,
            Some("off") => Splice::Off,
            Some(other) => {
                return Err(ConfigError::new("splice", other, "expected `auto` or `off`"))
            }
        };
        let table_size = opt_count("table-size", &args.table_size, DEFAULT_TABLE_SIZE)?;
        if !is_prime(table_size) {
            return Err(ConfigError::new(
                "table-size",
                args.table_size.as_deref().unwrap_or_default(),
                "must be a prime number",
            ));
        }
        if table_size <= backends.len() {
            return Err(ConfigError::new(
                "table-size",
                args.table_size.as_deref().unwrap_or_default(),
                "must be larger than the number of backends",
            ));
        }
        let seed = match &args.seed {
            None => 0,
            Some(raw) => raw.parse::<u64>().map_err(|_| {
                ConfigError::new("seed", raw, "expected an unsigned 64-bit integer")
            })?,
        };
        Ok(Config {
            listen,
            protocol,
            backends,
            affinity,
            sticky_timeout: opt_duration(
                "sticky-timeout",
                &args.sticky_timeout,
                DEFAULT_STICKY_TIMEOUT,
            )?,
            sticky_capacity: opt_count(
                "sticky-capacity",
                &args.sticky_capacity,
                DEFAULT_STICKY_CAPACITY,
            )?,
            connect_timeout: opt_duration(
                "connect-timeout",
                &args.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            idle_timeout: opt_duration("idle-timeout", &args.idle_timeout, DEFAULT_IDLE_TIMEOUT)?,
            workers: opt_nonzero("workers", &args.workers)?,
            max_conns: opt_nonzero("max-conns", &args.max_conns)?,
            splice,
            grace: opt_duration("grace", &args.grace, DEFAULT_GRACE)?,
            seed,
            table_size,
            sticky_prefill: match &args.sticky_prefill {
                None => 0,
                Some(raw) => raw.parse().map_err(|_| {
                    ConfigError::new("sticky-prefill", raw, "expected a whole number")
                })?,
            },
            udp_idle_timeout: opt_duration(
                "udp-idle-timeout",
                &args.udp_idle_timeout,
                DEFAULT_UDP_IDLE_TIMEOUT,
            )?,
            max_flows: opt_nonzero("max-flows", &args.max_flows)?,
        })
    }
}

/// Parse `ADDR[,weight=N][,name=NAME]`.
pub fn parse_backend(raw: &str) -> Result<BackendSpec, String> {
    let mut parts = raw.split(',');
    let addr_part = parts.next().unwrap_or_default();
    let addr = parse_addr(addr_part)?;
    if addr.port() == 0 {
        return Err("backend port must not be 0".into());
    }
    let mut weight = None;
    let mut name = None;
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("expected key=value after the address, got {part:?}"))?;
        match k {
            "weight" => {
                let w: u32 =
                    v.parse().map_err(|_| format!("weight {v:?} is not a whole number"))?;
                if !(1..=MAX_WEIGHT).contains(&w) {
                    return Err(format!("weight {w} out of range 1..={MAX_WEIGHT}"));
                }
                weight = NonZeroU32::new(w);
            }
            "name" => {
                if v.is_empty() || v.len() > 128 {
                    return Err("name must be 1 to 128 characters".into());
                }
                if !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:[]".contains(c)) {
                    return Err(format!("name {v:?} may only hold letters, digits and -_.:[]"));
                }
                name = Some(v.to_string());
            }
            other => {
                return Err(format!("unknown backend option {other:?} (expected weight or name)"))
            }
        }
    }
    Ok(BackendSpec {
        addr,
        name: name.unwrap_or_else(|| addr.to_string()),
        weight: weight.unwrap_or(NonZeroU32::MIN),
    })
}

fn parse_addr(raw: &str) -> Result<SocketAddr, String> {
    raw.parse::<SocketAddr>()
        .map_err(|_| "not an IP:port address (IPv6 goes in brackets: [::1]:5432)".to_string())
}

fn opt_duration(
    flag: &'static str,
    raw: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    let d = parse_duration(raw).map_err(|p| ConfigError::new(flag, raw, p))?;
    if d.is_zero() {
        return Err(ConfigError::new(flag, raw, "must be greater than zero"));
    }
    if d > MAX_DURATION {
        return Err(ConfigError::new(flag, raw, "must be at most a year (8760h)"));
    }
    Ok(d)
}

fn opt_count(
    flag: &'static str,
    raw: &Option<String>,
    default: usize,
) -> Result<usize, ConfigError> {
    match raw {
        None => Ok(default),
        Some(raw) => Ok(opt_nonzero(flag, &Some(raw.clone()))?.map_or(default, NonZeroUsize::get)),
    }
}

fn opt_nonzero(
    flag: &'static str,
    raw: &Option<String>,
) -> Result<Option<NonZeroUsize>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let n: usize = raw
        .parse()
        .map_err(|_| ConfigError::new(flag, raw, "expected a whole number greater than zero"))?;
    NonZeroUsize::new(n)
        .map(Some)
        .ok_or_else(|| ConfigError::new(flag, raw, "must be greater than zero"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Result<Config, String> {
        let args = Args::from_args(&["tether"], flags).map_err(|e| e.output)?;
        Config::try_from(args).map_err(|e| e.to_string())
    }

    const BASE: [&str; 4] = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"];

    fn with(extra: &[&str]) -> Result<Config, String> {
        let mut flags = BASE.to_vec();
        flags.extend_from_slice(extra);
        parse(&flags)
    }

    // === defaults ===

    #[test]
    fn defaults_are_the_named_constants() {
        let c = with(&[]).unwrap();
        assert_eq!(c.affinity, Affinity::Source);
        assert_eq!(c.splice, Splice::Auto);
        assert_eq!(c.sticky_timeout, DEFAULT_STICKY_TIMEOUT);
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(c.table_size, DEFAULT_TABLE_SIZE);
        assert_eq!(c.workers, None);
        assert_eq!(c.backends[0].weight.get(), 1);
        assert_eq!(c.protocol, Protocol::Tcp);
        assert_eq!(c.udp_idle_timeout, DEFAULT_UDP_IDLE_TIMEOUT);
        assert_eq!(c.max_flows, None);
        let both = with(&["--protocol", "both", "--max-flows", "10"]).unwrap();
        assert!(both.protocol.tcp() && both.protocol.udp());
        assert_eq!(both.max_flows.map(NonZeroUsize::get), Some(10));
    }

    #[test]
    fn backend_options_and_ipv6() {
        let c = parse(&[
            "--listen",
            "[::1]:5432",
            "--backend",
            "[::1]:1,weight=1000,name=db-1",
            "--backend",
            "10.0.0.2:5432,name=db-2,weight=3",
            "--affinity",
            "5tuple",
            "--idle-timeout",
            "90s",
            "--splice",
            "off",
        ])
        .unwrap();
        assert_eq!(c.listen[0], "[::1]:5432".parse().unwrap());
        assert_eq!(c.backends[0].name, "db-1");
        assert_eq!(c.backends[0].weight.get(), 1000);
        assert_eq!(c.backends[1].weight.get(), 3);
        assert_eq!(c.affinity, Affinity::FiveTuple);
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.splice, Splice::Off);
    }

    // === errors name the flag ===

    fn err(extra: &[&str]) -> String {
        with(extra).unwrap_err()
    }

    #[test]
    fn bad_values_name_their_flag() {
        assert!(parse(&["--backend", "127.0.0.1:2"]).unwrap_err().starts_with("--listen:"));
        assert!(parse(&["--listen", "127.0.0.1:2"]).unwrap_err().starts_with("--backend:"));
        assert!(parse(&["--listen", "nope", "--backend", "127.0.0.1:2"])
            .unwrap_err()
            .starts_with("--listen \"nope\""));
        assert!(err(&["--backend", "127.0.0.1:3,weight=0"]).contains("out of range"));
        assert!(err(&["--backend", "127.0.0.1:3,weight=1001"]).contains("out of range"));
        assert!(err(&["--backend", "127.0.0.1:3,weight=x"]).contains("not a whole number"));
        assert!(err(&["--backend", "127.0.0.1:3,colour=red"]).contains("unknown backend option"));
        assert!(err(&["--backend", "127.0.0.1:2"]).contains("used twice"));
        assert!(err(&["--backend", "127.0.0.1:0"]).contains("port must not be 0"));
        assert!(err(&["--affinity", "cookie"]).starts_with("--affinity \"cookie\""));
        assert!(err(&["--splice", "yes"]).starts_with("--splice"));
        assert!(err(&["--idle-timeout", "10"]).starts_with("--idle-timeout \"10\""));
        assert!(err(&["--connect-timeout", "0s"]).contains("greater than zero"));
        assert!(err(&["--idle-timeout", "9999999999999999h"]).contains("at most a year"));
        assert!(err(&["--grace", "8761h"]).contains("at most a year"));
        assert!(err(&["--workers", "0"]).starts_with("--workers"));
        assert!(err(&["--workers", "-1"]).starts_with("--workers"));
        assert!(err(&["--table-size", "65536"]).contains("prime"));
        assert!(err(&[
            "--table-size",
            "2",
            "--backend",
            "127.0.0.1:3,name=x",
            "--backend",
            "127.0.0.1:4"
        ])
        .contains("larger than"));
        assert!(err(&["--seed", "abc"]).starts_with("--seed"));
        assert!(err(&["--protocol", "sctp"]).starts_with("--protocol \"sctp\""));
        assert!(err(&["--udp-idle-timeout", "0s"]).starts_with("--udp-idle-timeout"));
        assert!(err(&["--max-flows", "0"]).starts_with("--max-flows"));
        assert!(err(&["--listen", "127.0.0.1:1"]).contains("given twice"));
    }

    #[test]
    fn errors_are_one_line() {
        for e in [err(&["--backend", "x"]), err(&["--grace", "5 parsecs"])] {
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
