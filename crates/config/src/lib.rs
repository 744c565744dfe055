//! Configuration: command-line flags or a TOML file -> one validated [`Config`].
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
//! assert_eq!(config.services[0].backends[0].weight.get(), 2);
//! assert_eq!(config.services[0].backends[1].name, "10.0.0.2:5432");
//! ```
//!
//! The defaults are named constants below; docs/configuration.md says why each was chosen.

#![forbid(unsafe_code)]

pub mod file;
pub mod man;
mod settings;
mod values;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

pub use settings::Args;
pub(crate) use settings::{PeersInput, ProcessInput, ServiceInput};
pub use values::*;
pub use vocab::duration::{format_duration, parse_duration};
pub use vocab::{Affinity, Listeners, OnDown, Protocol, ProxyVersion, Splice, UdpOffload};

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

/// How often a backend is probed (HAProxy's `inter 2s`).
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How long a probe may take before it counts as failed.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive good probes that bring a down backend back (HAProxy's `rise 2`).
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Consecutive failures (probes or passive) that take a backend down (HAProxy's `fall 3`).
pub const DEFAULT_HEALTH_FALL: u32 = 3;
/// Admin HTTP connections open at once: dashboards, scrapers and an operator's shell. Each is
/// one file descriptor kept out of the session budget.
pub const DEFAULT_ADMIN_MAX_CONNS: usize = 64;
/// How long an admin client may take to send a request head (or, on a keep-alive connection,
/// to start the next one) and then its body: a slowloris holds a connection no longer.
pub const DEFAULT_ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most admin connections accepted as a setting.
pub const MAX_ADMIN_CONNS: usize = 10_000;
/// Largest UDP socket buffer accepted as a setting: the kernel doubles the value it is given
/// into an `int` (socket(7), SO_RCVBUF).
pub const MAX_UDP_BUFFER: usize = 1 << 30;
/// How often the sticky tables are saved to the state file: a crash loses at most this much
/// of pinning history, and a save of 1M entries takes well under a second of one core.
pub const DEFAULT_STATE_INTERVAL: Duration = Duration::from_secs(10);
/// Name of the service the flags define.
pub const DEFAULT_SERVICE: &str = "default";

/// One backend as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub name: String,
    pub weight: NonZeroU32,
    /// Most TCP sessions open (or connecting) to it at once; `None`: no limit. A full backend is
    /// skipped like a down one until a session ends.
    pub max_conns: Option<NonZeroU32>,
}

/// What an active health probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// No probes: only passive failures from the data path count.
    Off,
    /// A TCP connect to the backend's address.
    Tcp,
    /// Send `send` over UDP; a reply starting with `expect` is good (empty: any reply).
    Udp { send: Vec<u8>, expect: Vec<u8> },
}

/// Health checking of one service's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub check: HealthCheck,
    /// A TCP probe sends this PROXY header (LOCAL command) before it closes.
    pub send_proxy: Option<ProxyVersion>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Open sessions and flows of a backend that goes down or into maintenance.
    pub on_down: OnDown,
}

/// `keep` or `kill`.
pub fn parse_on_down(raw: &str) -> Result<OnDown, String> {
    match raw {
        "keep" => Ok(OnDown::Keep),
        "kill" => Ok(OnDown::Kill),
        _ => Err("expected `keep` or `kill`".into()),
    }
}

/// Who may connect, and how much (issue 6; docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    pub allow: Vec<vocab::Cidr>,
    pub deny: Vec<vocab::Cidr>,
    pub max_conns_per_source: Option<u32>,
    pub conn_rate_per_source: Option<u32>,
    pub flow_rate_per_source: Option<u32>,
    /// Most client IPs the per-source limits track.
    pub tracked_sources: usize,
    /// The limits count per affinity prefix rather than per address.
    pub limit_per_prefix: bool,
}

impl GuardConfig {
    /// Whether any per-source limit is set.
    pub fn limits(&self) -> bool {
        self.max_conns_per_source.is_some()
            || self.conn_rate_per_source.is_some()
            || self.flow_rate_per_source.is_some()
    }
}

/// The PROXY protocol, both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Header sent to backends (TCP: this version; UDP: always v2).
    pub send: Option<ProxyVersion>,
    /// UDP: a header on every datagram, not only a flow's first.
    pub send_every_datagram: bool,
    /// Sources whose header is required and believed; empty: no header is read.
    pub trusted: Vec<vocab::Cidr>,
    /// How long a trusted proxy may take to send its whole header.
    pub header_timeout: Duration,
}

/// Most client IPs the per-source limits track by default (7-15 MB).
pub const DEFAULT_TRACKED_SOURCES: usize = 100_000;
/// How long a trusted proxy may take to send its PROXY header.
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams a new address sends with a flow's session key before the flow moves to it.
pub const DEFAULT_UDP_MIGRATE_AFTER: u32 = 2;
/// Highest per-source rate or count accepted.
pub const MAX_PER_SOURCE: u32 = 1_000_000;

/// One service: its listeners, its pool and its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub protocol: Protocol,
    pub backends: Vec<BackendSpec>,
    pub affinity: Affinity,
    /// With source affinity, how much of the address pins a client (`source/24,64`).
    pub prefix: vocab::Prefix,
    /// Bounded-load choice for clients without a pin (`None`: off).
    pub balance_factor: Option<f64>,
    pub sticky_timeout: Duration,
    pub sticky_capacity: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub udp_idle_timeout: Duration,
    /// UDP flows and pins keyed by these payload bytes (`None`: by the client's address).
    pub udp_session_key: Option<vocab::SessionKey>,
    /// Datagrams a new address sends with a flow's key before the flow moves to it.
    pub udp_migrate_after: u32,
    /// SO_RCVBUF / SO_SNDBUF of UDP listener and flow sockets; `None`: the kernel's default.
    pub udp_rcvbuf: Option<usize>,
    pub udp_sndbuf: Option<usize>,
    pub seed: u64,
    pub table_size: usize,
    pub health: HealthConfig,
    pub guard: GuardConfig,
    pub proxy: ProxyConfig,
    /// Local IPs backend connects go out from, in turn (empty: the kernel chooses). Every
    /// backend has at least one of its own family here when it is not empty.
    pub connect_from: Vec<IpAddr>,
}

/// A validated configuration: every field holds a usable value.
#[derive(Debug, Clone)]
pub struct Config {
    /// At least one; names and listen addresses unique across services.
    pub services: Vec<Service>,
    /// The file the services came from (`--config`); reloads read it again.
    pub file: Option<std::path::PathBuf>,
    pub admin: Option<SocketAddr>,
    /// Where the admin token is (read at start); required for a non-loopback admin.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Admin connections open at once.
    pub admin_max_conns: usize,
    /// Deadline for an admin request's head (and idle wait before it) and for its body.
    pub admin_timeout: Duration,
    /// Drop root for this user (and group) once every listener is bound.
    pub user: Option<UserSpec>,
    /// `None`: one per CPU, decided at start.
    pub workers: Option<NonZeroUsize>,
    /// `None`: derived from the file-descriptor limit at start.
    pub max_conns: Option<NonZeroUsize>,
    /// `None`: derived from the file-descriptor limit at start.
    pub max_flows: Option<NonZeroUsize>,
    pub splice: Splice,
    pub listeners: Listeners,
    pub grace: Duration,
    /// How long the old process serves its open sessions after an upgrade.
    pub upgrade_grace: Duration,
    /// Idle sticky entries inserted at start in the first service (benchmarks only).
    pub sticky_prefill: usize,
    /// Where the sticky tables are saved and loaded from (`None`: memory only).
    pub state_file: Option<std::path::PathBuf>,
    /// How often they are saved.
    pub state_interval: Duration,
    /// Whether established UDP flows are handed to the kernel.
    pub udp_offload: UdpOffload,
    /// This instance's name (among peers, in logs and `/api/status`).
    pub name: String,
    /// The other instances pins are shared with (`None`: no peers).
    pub peers: Option<Peers>,
    /// A line per finished session, expired flow and refused client on stdout.
    pub log_sessions: bool,
    pub log_format: LogFormat,
}

/// How session log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `key=value` pairs.
    #[default]
    Logfmt,
    /// One JSON object per line.
    Json,
}

fn parse_log_format(raw: &str) -> Result<LogFormat, String> {
    match raw {
        "logfmt" => Ok(LogFormat::Logfmt),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected `logfmt` or `json`".to_string()),
    }
}

/// Sharing pins with other instances (issue 14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    /// The others, by name: whom this instance connects to.
    pub peers: Vec<Peer>,
    /// Where the others connect to this one.
    pub listen: Option<SocketAddr>,
    /// The shared key's file (read at start).
    pub key_file: std::path::PathBuf,
    pub health: PeerHealth,
}

/// Another instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub addr: SocketAddr,
}

/// Whether peers' views of backend health count here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerHealth {
    /// A backend is down here when more than half of the instances that report on it (this
    /// one included) see it down.
    Quorum,
    /// Each instance's own probes only.
    Off,
}

/// A setting that could not be accepted: where it was (a flag such as `--listen`, or a key path
/// in the config file such as `service[0].backend[1].weight`), the value given, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub place: String,
    pub value: Option<String>,
    pub problem: String,
}

impl ConfigError {
    /// An error at key path `place` of a config file.
    pub fn at(place: impl Into<String>, value: Option<String>, problem: impl Into<String>) -> Self {
        ConfigError { place: place.into(), value, problem: problem.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} {:?}: {}", self.place, v, self.problem),
            None => write!(f, "{}: {}", self.place, self.problem),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Flags that describe the settings (every one but `--config` and `--sticky-prefill`); refused
/// next to `--config`.
fn service_flags(args: &Args) -> Vec<String> {
    let mut given = Vec::new();
    if !args.listen.is_empty() {
        given.push("listen".to_string());
    }
    if !args.backend.is_empty() {
        given.push("backend".to_string());
    }
    given.extend(ServiceInput::given(args));
    given.extend(ProcessInput::given(args));
    given.extend(PeersInput::given(args));
    given
}

/// Where settings are read from, so that an error names the setting the way the operator wrote
/// it: a flag (`--grace`) or a key path of the config file (`grace`, `service[1].listen[0]`).
/// The keys are the flags' names, so one name serves both.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    Flags,
    /// A table of the config file: `""` for the top level, else its path such as `service[1]`.
    Table(String),
}

impl Origin {
    fn place(&self, key: &str) -> String {
        match self {
            Origin::Flags => format!("--{key}"),
            Origin::Table(table) if table.is_empty() => key.to_string(),
            Origin::Table(table) => format!("{table}.{key}"),
        }
    }

    /// The place of the `i`th value of a list; a repeated flag has no index.
    fn item(&self, key: &str, i: usize) -> String {
        match self {
            Origin::Flags => self.place(key),
            Origin::Table(_) => format!("{}[{i}]", self.place(key)),
        }
    }

    fn error(&self, key: &str, value: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::at(self.place(key), Some(value.to_string()), problem)
    }

    fn missing(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::at(self.place(key), None, problem)
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        if let Some(path) = &args.config {
            if let Some(flag) = service_flags(&args).first() {
                return Err(Origin::Flags.missing(
                    flag,
                    "cannot be combined with --config: set it in the file (same key name)",
                ));
            }
            let mut config = file::load_path(std::path::Path::new(path))?;
            config.sticky_prefill = prefill(&args)?;
            return Ok(config);
        }
        let service = flag_service(&args)?;
        let mut config = build_config(&Origin::Flags, &ProcessInput::from(&args), vec![service])?;
        config.sticky_prefill = prefill(&args)?;
        (config.name, config.peers) = build_peers(&Origin::Flags, &PeersInput::from(&args))?;
        Ok(config)
    }
}

fn prefill(args: &Args) -> Result<usize, ConfigError> {
    match &args.sticky_prefill {
        None => Ok(0),
        Some(raw) => raw
            .parse()
            .map_err(|_| Origin::Flags.error("sticky-prefill", raw, "expected a whole number")),
    }
}

/// The service `default` from the flags.
fn flag_service(args: &Args) -> Result<Service, ConfigError> {
    let flags = Origin::Flags;
    let listen = listen_addrs(&flags, &args.listen)?;
    let mut backends = Vec::with_capacity(args.backend.len());
    for raw in &args.backend {
        let spec = parse_backend(raw).map_err(|p| flags.error("backend", raw, p))?;
        add_backend(&mut backends, spec).map_err(|p| flags.error("backend", raw, p))?;
    }
    build_service(&flags, DEFAULT_SERVICE.to_string(), listen, backends, &ServiceInput::from(args))
}

/// A service's listen addresses: at least one, none twice.
pub(crate) fn listen_addrs(
    origin: &Origin,
    raw: &[String],
) -> Result<Vec<SocketAddr>, ConfigError> {
    if raw.is_empty() {
        return Err(origin.missing("listen", "at least one listen address is required"));
    }
    let mut listen = Vec::with_capacity(raw.len());
    for (i, raw) in raw.iter().enumerate() {
        let error = |p| ConfigError::at(origin.item("listen", i), Some(raw.clone()), p);
        let addr = parse_addr(raw).map_err(error)?;
        if listen.contains(&addr) {
            return Err(error("given twice".to_string()));
        }
        listen.push(addr);
    }
    Ok(listen)
}

/// Append `spec` to a pool unless its name is taken.
pub(crate) fn add_backend(
    backends: &mut Vec<BackendSpec>,
    spec: BackendSpec,
) -> Result<(), String> {
    if backends.iter().any(|b| b.name == spec.name) {
        return Err(format!("backend name {:?} is used twice", spec.name));
    }
    backends.push(spec);
    Ok(())
}

/// A service from its parsed listeners and pool and its other settings as given.
pub(crate) fn build_service(
    origin: &Origin,
    name: String,
    listen: Vec<SocketAddr>,
    backends: Vec<BackendSpec>,
    input: &ServiceInput,
) -> Result<Service, ConfigError> {
    if backends.is_empty() {
        return Err(origin.missing("backend", "at least one backend is required"));
    }
    let (affinity, prefix) = opt(
        origin,
        "affinity",
        &input.affinity,
        (Affinity::Source, vocab::Prefix::HOST),
        parse_affinity,
    )?;
    let protocol = opt(origin, "protocol", &input.protocol, Protocol::Tcp, parse_protocol)?;
    let table_size = opt_count(origin, "table-size", &input.table_size, DEFAULT_TABLE_SIZE)?;
    check_table_size(table_size, backends.len()).map_err(|p| {
        let raw = input.table_size.clone().unwrap_or_else(|| table_size.to_string());
        origin.error("table-size", &raw, p)
    })?;
    let seed = opt(origin, "seed", &input.seed, 0, parse_seed)?;
    let mut health = build_health(origin, input, protocol)?;
    let guard = build_guard(origin, input)?;
    if guard.limit_per_prefix && prefix.is_host() {
        let raw = input.limit_per.clone().unwrap_or_default();
        return Err(origin.error(
            "limit-per",
            &raw,
            "`prefix` counts per --affinity source/N network; this service keys whole addresses"
                .to_string(),
        ));
    }
    let proxy = build_proxy(origin, input)?;
    health.send_proxy = health_send_proxy(origin, input, &health.check, proxy.send)?;
    let udp_buffer = |key: &str, raw: &Option<String>| match raw {
        Some(raw) if !protocol.udp() => {
            Err(origin.error(key, raw, "needs UDP listeners (protocol `udp` or `both`)"))
        }
        _ => opt(origin, key, raw, None, |r| parse_udp_buffer(r).map(Some)),
    };
    let udp_rcvbuf = udp_buffer("udp-rcvbuf", &input.udp_rcvbuf)?;
    let udp_session_key = match &input.udp_session_key {
        Some(raw) if !protocol.udp() => {
            return Err(origin.error(
                "udp-session-key",
                raw,
                "needs UDP listeners (protocol `udp` or `both`)",
            ))
        }
        Some(raw) if input.accept_proxy => {
            return Err(origin.error(
                "udp-session-key",
                raw,
                "cannot be used with accept-proxy: the key is found in the payload as the client sent it, before any PROXY header is taken off",
            ))
        }
        raw => opt(origin, "udp-session-key", raw, None, |r| r.parse().map(Some))?,
    };
    let udp_migrate_after = match &input.udp_migrate_after {
        Some(raw) if udp_session_key.is_none() => {
            return Err(origin.error("udp-migrate-after", raw, "needs udp-session-key"))
        }
        raw => opt(origin, "udp-migrate-after", raw, DEFAULT_UDP_MIGRATE_AFTER, |r| {
            match r.parse::<u32>() {
                Ok(n) if (1..=1000).contains(&n) => Ok(n),
                _ => Err("expected a count of datagrams from 1 to 1000".into()),
            }
        })?,
    };
    let udp_sndbuf = udp_buffer("udp-sndbuf", &input.udp_sndbuf)?;
    let connect_from = build_connect_from(origin, &input.connect_from, &backends)?;
    Ok(Service {
        name,
        listen,
        protocol,
        backends,
        affinity,
        prefix,
        balance_factor: opt(
            origin,
            "balance-factor",
            &input.balance_factor,
            None,
            |raw| match raw.parse::<f64>() {
                Ok(f) if (1.0..=100.0).contains(&f) => Ok(Some(f)),
                Ok(_) => Err("a factor from 1 to 100 (1.25: at most 25% over the average)".into()),
                Err(_) => Err("expected a number such as 1.25".into()),
            },
        )?,
        sticky_timeout: opt(
            origin,
            "sticky-timeout",
            &input.sticky_timeout,
            DEFAULT_STICKY_TIMEOUT,
            check_duration,
        )?,
        sticky_capacity: opt_count(
            origin,
            "sticky-capacity",
            &input.sticky_capacity,
            DEFAULT_STICKY_CAPACITY,
        )?,
        connect_timeout: opt(
            origin,
            "connect-timeout",
            &input.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
            check_duration,
        )?,
        idle_timeout: opt(
            origin,
            "idle-timeout",
            &input.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
            check_duration,
        )?,
        udp_idle_timeout: opt(
            origin,
            "udp-idle-timeout",
            &input.udp_idle_timeout,
            DEFAULT_UDP_IDLE_TIMEOUT,
            check_duration,
        )?,
        udp_session_key,
        udp_migrate_after,
        udp_rcvbuf,
        udp_sndbuf,
        seed,
        table_size,
        health,
        guard,
        proxy,
        connect_from,
    })
}

/// Which PROXY header TCP probes send: the service's own version unless `health-send-proxy`
/// is `off`; `on` needs `send-proxy`.
fn health_send_proxy(
    origin: &Origin,
    input: &ServiceInput,
    check: &HealthCheck,
    send: Option<ProxyVersion>,
) -> Result<Option<ProxyVersion>, ConfigError> {
    let key = "health-send-proxy";
    let on = opt(origin, key, &input.health_send_proxy, send.is_some(), parse_on_off)?;
    match (on, send) {
        (false, _) => Ok(None),
        (true, None) => Err(origin.error(key, "on", "needs send-proxy")),
        (true, Some(_)) if !matches!(check, HealthCheck::Tcp) => {
            // A UDP probe's payload is the operator's own, and `off` sends nothing.
            Ok(None)
        }
        (true, Some(version)) => Ok(Some(version)),
    }
}

/// `on` or `off`.
pub fn parse_on_off(raw: &str) -> Result<bool, String> {
    match raw {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("expected `on` or `off`".into()),
    }
}

/// A UDP socket buffer size in bytes: 1..=2^30. A size below the kernel's minimum is accepted:
/// the kernel raises it (socket(7)), and tether logs what it got.
pub fn parse_udp_buffer(raw: &str) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(n) if (1..=MAX_UDP_BUFFER).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number of bytes from 1 to {MAX_UDP_BUFFER}")),
    }
}

/// Local IPs to connect to backends from: distinct unicast addresses, and one of each backend
/// family at least (a backend no address can reach would fail every connect).
fn build_connect_from(
    origin: &Origin,
    raw: &[String],
    backends: &[BackendSpec],
) -> Result<Vec<IpAddr>, ConfigError> {
    let mut ips: Vec<IpAddr> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let place = || origin.item("connect-from", i);
        let ip = parse_connect_from(r).map_err(|p| ConfigError::at(place(), Some(r.clone()), p))?;
        if ips.contains(&ip) {
            return Err(ConfigError::at(place(), Some(r.clone()), "given twice"));
        }
        ips.push(ip);
    }
    for b in backends {
        if !connect_from_reaches(&ips, b.addr) {
            let family = if b.addr.is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(origin.missing(
                "connect-from",
                format!("backend {} is {family} and no connect-from address is", b.addr),
            ));
        }
    }
    Ok(ips)
}

/// Whether a backend at `backend` can be connected to from `from`: one of its family is
/// there, or the list is empty (the kernel chooses).
pub fn connect_from_reaches(from: &[IpAddr], backend: SocketAddr) -> bool {
    from.is_empty() || from.iter().any(|ip| ip.is_ipv4() == backend.is_ipv4())
}

/// A local IP address to connect from: unicast, without a port.
pub fn parse_connect_from(raw: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = raw.parse().map_err(|_| {
        if raw.parse::<SocketAddr>().is_ok() {
            "expected an IP address without a port (the kernel picks the port)".to_string()
        } else {
            "expected an IP address such as 10.0.0.5 or 2001:db8::5".to_string()
        }
    })?;
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        return Err("expected a unicast address of this host".into());
    }
    Ok(ip)
}

/// Networks from a list setting; errors name the item.
fn cidrs(origin: &Origin, key: &str, raw: &[String]) -> Result<Vec<vocab::Cidr>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            r.parse::<vocab::Cidr>()
                .map_err(|e| ConfigError::at(origin.item(key, i), Some(r.clone()), e.to_string()))
        })
        .collect()
}

/// A per-source count or rate: 1..=1,000,000.
pub fn parse_per_source(raw: &str) -> Result<u32, String> {
    match raw.parse::<u32>() {
        Ok(n) if (1..=MAX_PER_SOURCE).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {MAX_PER_SOURCE}")),
    }
}

fn build_guard(origin: &Origin, input: &ServiceInput) -> Result<GuardConfig, ConfigError> {
    let per = |key: &str, raw: &Option<String>| {
        opt(origin, key, raw, None, |r| parse_per_source(r).map(Some))
    };
    Ok(GuardConfig {
        allow: cidrs(origin, "allow", &input.allow)?,
        deny: cidrs(origin, "deny", &input.deny)?,
        max_conns_per_source: per("max-conns-per-source", &input.max_conns_per_source)?,
        conn_rate_per_source: per("max-conn-rate-per-source", &input.max_conn_rate_per_source)?,
        flow_rate_per_source: per("max-flow-rate-per-source", &input.max_flow_rate_per_source)?,
        tracked_sources: opt_count(
            origin,
            "tracked-sources",
            &input.tracked_sources,
            DEFAULT_TRACKED_SOURCES,
        )?,
        limit_per_prefix: opt(origin, "limit-per", &input.limit_per, false, |r| match r {
            "address" => Ok(false),
            "prefix" => Ok(true),
            _ => Err("expected `address` or `prefix`".to_string()),
        })?,
    })
}

/// `v1` or `v2`.
pub fn parse_proxy_version(raw: &str) -> Result<ProxyVersion, String> {
    match raw {
        "v1" => Ok(ProxyVersion::V1),
        "v2" => Ok(ProxyVersion::V2),
        _ => Err("expected `v1` or `v2`".into()),
    }
}

fn build_proxy(origin: &Origin, input: &ServiceInput) -> Result<ProxyConfig, ConfigError> {
    let send =
        opt(origin, "send-proxy", &input.send_proxy, None, |r| parse_proxy_version(r).map(Some))?;
    if input.send_proxy_every_datagram && send.is_none() {
        return Err(origin.missing("send-proxy-every-datagram", "needs send-proxy"));
    }
    let trusted = cidrs(origin, "trusted-proxies", &input.trusted_proxies)?;
    if input.accept_proxy && trusted.is_empty() {
        return Err(origin.missing(
            "accept-proxy",
            "needs trusted-proxies: a header is believed only from the proxies listed there",
        ));
    }
    if !input.accept_proxy && !trusted.is_empty() {
        return Err(origin.missing("trusted-proxies", "needs accept-proxy"));
    }
    Ok(ProxyConfig {
        send,
        send_every_datagram: input.send_proxy_every_datagram,
        trusted,
        header_timeout: opt(
            origin,
            "proxy-header-timeout",
            &input.proxy_header_timeout,
            DEFAULT_PROXY_HEADER_TIMEOUT,
            check_duration,
        )?,
    })
}

fn build_health(
    origin: &Origin,
    input: &ServiceInput,
    protocol: Protocol,
) -> Result<HealthConfig, ConfigError> {
    let send = opt(origin, "health-send", &input.health_send, None, |raw| unescape(raw).map(Some))?;
    let expect =
        opt(origin, "health-expect", &input.health_expect, None, |raw| unescape(raw).map(Some))?;
    let check = health_check(input.health_check.as_deref(), send, expect, protocol).map_err(
        |(key, p)| match key {
            "health-check" => {
                origin.error(key, input.health_check.as_deref().unwrap_or_default(), p)
            }
            _ => origin.missing(key, p),
        },
    )?;
    let interval = opt(
        origin,
        "health-interval",
        &input.health_interval,
        DEFAULT_HEALTH_INTERVAL,
        check_duration,
    )?;
    let timeout = opt(
        origin,
        "health-timeout",
        &input.health_timeout,
        DEFAULT_HEALTH_TIMEOUT,
        check_duration,
    )?;
    if timeout > interval {
        let raw = input.health_timeout.clone().unwrap_or_else(|| format_duration(timeout));
        let problem = format!("must be at most the interval ({})", format_duration(interval));
        return Err(origin.error("health-timeout", &raw, problem));
    }
    let rise = opt(origin, "health-rise", &input.health_rise, DEFAULT_HEALTH_RISE, parse_small)?;
    let fall = opt(origin, "health-fall", &input.health_fall, DEFAULT_HEALTH_FALL, parse_small)?;
    let on_down = opt(origin, "on-down", &input.on_down, OnDown::Keep, parse_on_down)?;
    Ok(HealthConfig { check, send_proxy: None, interval, timeout, rise, fall, on_down })
}

/// The whole configuration from validated services and the process-wide settings as given.
/// `sticky_prefill` is 0 and `file` is `None`: the callers set them.
pub(crate) fn build_config(
    origin: &Origin,
    input: &ProcessInput,
    services: Vec<Service>,
) -> Result<Config, ConfigError> {
    let admin = opt(origin, "admin", &input.admin, None, |raw| {
        check_admin(raw, input.admin_allow_remote).map(Some)
    })?;
    let splice = opt(origin, "splice", &input.splice, Splice::Auto, parse_splice)?;
    if input.admin_allow_remote && input.admin_token_file.is_none() {
        return Err(origin.missing(
            "admin-token-file",
            "required with admin-allow-remote: an exposed admin interface needs a token",
        ));
    }
    let user = opt(origin, "user", &input.user, None, |raw| parse_user(raw).map(Some))?;
    let grace = opt(origin, "grace", &input.grace, DEFAULT_GRACE, check_duration)?;
    Ok(Config {
        services,
        file: None,
        admin,
        admin_token_file: input.admin_token_file.as_ref().map(std::path::PathBuf::from),
        admin_max_conns: opt(
            origin,
            "admin-max-conns",
            &input.admin_max_conns,
            DEFAULT_ADMIN_MAX_CONNS,
            parse_admin_conns,
        )?,
        admin_timeout: opt(
            origin,
            "admin-timeout",
            &input.admin_timeout,
            DEFAULT_ADMIN_TIMEOUT,
            check_duration,
        )?,
        user,
        workers: opt_nonzero(origin, "workers", &input.workers)?,
        max_conns: opt_nonzero(origin, "max-conns", &input.max_conns)?,
        max_flows: opt_nonzero(origin, "max-flows", &input.max_flows)?,
        splice,
        listeners: opt(origin, "listeners", &input.listeners, Listeners::Shared, parse_listeners)?,
        grace,
        upgrade_grace: opt(origin, "upgrade-grace", &input.upgrade_grace, grace, check_duration)?,
        sticky_prefill: 0,
        state_file: opt(origin, "state-file", &input.state_file, None, |raw| {
            if raw.is_empty() {
                return Err("expected a file path".to_string());
            }
            Ok(Some(std::path::PathBuf::from(raw)))
        })?,
        state_interval: opt(
            origin,
            "state-interval",
            &input.state_interval,
            DEFAULT_STATE_INTERVAL,
            check_duration,
        )?,
        udp_offload: opt(
            origin,
            "udp-offload",
            &input.udp_offload,
            UdpOffload::Auto,
            parse_udp_offload,
        )?,
        name: host_name(),
        peers: None,
        log_sessions: input.log_sessions,
        log_format: opt(
            origin,
            "log-format",
            &input.log_format,
            LogFormat::Logfmt,
            parse_log_format,
        )?,
    })
}

/// This host's name, the default instance name (`localhost` if it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| check_name(s).is_ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The instance name and the peers, from flags or the `[peers]` table.
pub(crate) fn build_peers(
    origin: &Origin,
    input: &PeersInput,
) -> Result<(String, Option<Peers>), ConfigError> {
    let name = opt(origin, "name", &input.name, host_name(), |raw| {
        check_name(raw).map(|()| raw.to_string())
    })?;
    let mut peers: Vec<Peer> = Vec::new();
    for (i, raw) in input.peer.iter().enumerate() {
        let place = origin.item("peer", i);
        let bad = |p: String| ConfigError::at(place.clone(), Some(raw.clone()), p);
        let (peer, addr) = raw.split_once('=').ok_or_else(|| bad("expected NAME=ADDR".into()))?;
        check_name(peer).map_err(bad)?;
        let addr = parse_addr(addr).map_err(bad)?;
        if peer == name {
            return Err(bad(format!("{peer:?} is this instance's own name (--name)")));
        }
        if peers.iter().any(|p| p.name == peer) {
            return Err(bad(format!("{peer:?} is named twice")));
        }
        peers.push(Peer { name: peer.to_string(), addr });
    }
    let listen = opt(origin, "peer-listen", &input.peer_listen, None, |raw| {
        let addr = parse_addr(raw)?;
        if !addr.ip().is_loopback() && !input.peer_allow_remote {
            return Err("not a loopback address: peers can pin every client; pass \
                        --peer-allow-remote (key `peer-allow-remote`) to expose it"
                .into());
        }
        Ok(Some(addr))
    })?;
    let health =
        opt(origin, "peer-health", &input.peer_health, PeerHealth::Off, |raw| match raw {
            "quorum" => Ok(PeerHealth::Quorum),
            "off" => Ok(PeerHealth::Off),
            _ => Err("expected `quorum` or `off`".into()),
        })?;
    if peers.is_empty() && listen.is_none() {
        return Ok((name, None));
    }
    let Some(key_file) = input.peer_key_file.as_ref().filter(|f| !f.is_empty()) else {
        return Err(origin.missing(
            "peer-key-file",
            "required with peers: they prove to each other that they hold this key",
        ));
    };
    let key_file = std::path::PathBuf::from(key_file);
    Ok((name, Some(Peers { peers, listen, key_file, health })))
}

/// The setting `key`: `default` when not given, else `raw` checked by `parse`.
fn opt<T>(
    origin: &Origin,
    key: &str,
    raw: &Option<String>,
    default: T,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    match raw {
        None => Ok(default),
        Some(raw) => parse(raw).map_err(|p| origin.error(key, raw, p)),
    }
}

fn opt_count(
    origin: &Origin,
    key: &str,
    raw: &Option<String>,
    default: usize,
) -> Result<usize, ConfigError> {
    opt(origin, key, raw, default, |raw| parse_count(raw).map(NonZeroUsize::get))
}

fn opt_nonzero(
    origin: &Origin,
    key: &str,
    raw: &Option<String>,
) -> Result<Option<NonZeroUsize>, ConfigError> {
    opt(origin, key, raw, None, |raw| parse_count(raw).map(Some))
}

#[cfg(test)]
mod tests {
    use argh::FromArgs;

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
        assert_eq!(c.services[0].affinity, Affinity::Source);
        assert_eq!(c.splice, Splice::Auto);
        assert_eq!(c.services[0].sticky_timeout, DEFAULT_STICKY_TIMEOUT);
        assert_eq!(c.services[0].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.services[0].idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(c.services[0].table_size, DEFAULT_TABLE_SIZE);
        assert_eq!(c.workers, None);
        assert_eq!(c.services[0].backends[0].weight.get(), 1);
        assert_eq!(c.services[0].protocol, Protocol::Tcp);
        assert_eq!(c.services[0].udp_idle_timeout, DEFAULT_UDP_IDLE_TIMEOUT);
        assert_eq!(c.max_flows, None);
        let both = with(&["--protocol", "both", "--max-flows", "10"]).unwrap();
        assert!(both.services[0].protocol.tcp() && both.services[0].protocol.udp());
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
        assert_eq!(c.services[0].listen[0], "[::1]:5432".parse().unwrap());
        assert_eq!(c.services[0].backends[0].name, "db-1");
        assert_eq!(c.services[0].backends[0].weight.get(), 1000);
        assert_eq!(c.services[0].backends[1].weight.get(), 3);
        assert_eq!(c.services[0].affinity, Affinity::FiveTuple);
        assert_eq!(c.services[0].idle_timeout, Duration::from_secs(90));
        assert_eq!(c.splice, Splice::Off);
    }

    #[test]
    fn probes_send_the_services_proxy_version_unless_told_not_to() {
        let probe = |extra: &[&str]| with(extra).unwrap().services[0].health.send_proxy;
        assert_eq!(probe(&[]), None);
        assert_eq!(probe(&["--send-proxy", "v1"]), Some(ProxyVersion::V1));
        assert_eq!(probe(&["--send-proxy", "v2"]), Some(ProxyVersion::V2));
        assert_eq!(probe(&["--send-proxy", "v2", "--health-send-proxy", "off"]), None);
        assert_eq!(probe(&["--send-proxy", "v2", "--health-check", "off"]), None);
        // A UDP probe's payload is the operator's own: no header in front of it.
        let udp = ["--send-proxy", "v2", "--protocol", "udp", "--health-send", "ping"];
        assert_eq!(probe(&udp), None);
        assert!(
            err(&["--health-send-proxy", "on"]).starts_with("--health-send-proxy \"on\": needs")
        );
    }

    #[test]
    fn admin_limits_default_and_parse() {
        let c = with(&[]).unwrap();
        assert_eq!((c.admin_max_conns, c.admin_timeout), (64, Duration::from_secs(10)));
        let c = with(&["--admin-max-conns", "3", "--admin-timeout", "500ms"]).unwrap();
        assert_eq!((c.admin_max_conns, c.admin_timeout), (3, Duration::from_millis(500)));
        assert!(err(&["--admin-max-conns", "10001"]).starts_with("--admin-max-conns \"10001\""));
    }

    // === errors name the flag ===

    fn err(extra: &[&str]) -> String {
        with(extra).unwrap_err()
    }

    #[test]
    fn affinity_by_prefix_and_limits_per_prefix() {
        let c = with(&["--affinity", "source/24"]).unwrap();
        assert_eq!(c.services[0].affinity, Affinity::Source);
        assert_eq!(c.services[0].prefix, vocab::Prefix { v4: 24, v6: 128 });
        let c = with(&["--affinity", "source/24,64", "--limit-per", "prefix"]).unwrap();
        assert_eq!(c.services[0].prefix, vocab::Prefix { v4: 24, v6: 64 });
        assert!(c.services[0].guard.limit_per_prefix);
        assert_eq!(with(&[]).unwrap().services[0].prefix, vocab::Prefix::HOST);
        assert!(!with(&[]).unwrap().services[0].guard.limit_per_prefix);
        for (bad, says) in [
            ("source/33", "1 to 32, not 33"),
            ("source/0", "1 to 32, not 0"),
            ("source/24,129", "1 to 128, not 129"),
            ("source/24,0", "1 to 128, not 0"),
            ("source/x", "expected `source`"),
            ("source/24,", "expected `source`"),
            ("source/", "expected `source`"),
            ("5tuple/24", "expected `source`"),
        ] {
            let e = err(&["--affinity", bad]);
            assert!(
                e.starts_with(&format!("--affinity {bad:?}")) && e.contains(says),
                "{bad}: {e}"
            );
        }
        let e = err(&["--limit-per", "prefix"]);
        assert!(e.starts_with("--limit-per \"prefix\"") && e.contains("source/N"), "{e}");
        let e = err(&["--affinity", "source/24", "--limit-per", "nat"]);
        assert!(e.starts_with("--limit-per \"nat\"") && e.contains("`address` or `prefix`"), "{e}");
    }

    #[test]
    fn balance_factor() {
        assert_eq!(with(&[]).unwrap().services[0].balance_factor, None);
        let c = with(&["--balance-factor", "1.25"]).unwrap();
        assert_eq!(c.services[0].balance_factor, Some(1.25));
        for (bad, says) in [
            ("0.9", "from 1 to 100"),
            ("101", "from 1 to 100"),
            ("NaN", "from 1 to 100"),
            ("x", "a number"),
        ] {
            let e = err(&["--balance-factor", bad]);
            assert!(e.starts_with(&format!("--balance-factor {bad:?}")) && e.contains(says), "{e}");
        }
    }

    #[test]
    fn udp_session_key_and_migrate_after() {
        let c = with(&[]).unwrap();
        assert_eq!((c.services[0].udp_session_key, c.services[0].udp_migrate_after), (None, 2));
        let c =
            with(&["--protocol", "udp", "--udp-session-key", "4:8", "--udp-migrate-after", "3"])
                .unwrap();
        let key = vocab::SessionKey { offset: 4, len: 8 };
        assert_eq!(
            (c.services[0].udp_session_key, c.services[0].udp_migrate_after),
            (Some(key), 3)
        );
        for (bad, says) in [
            (&["--protocol", "udp", "--udp-session-key", "4"][..], "OFFSET:LENGTH"),
            (&["--protocol", "udp", "--udp-session-key", "0:65"], "1 to 64"),
            (&["--udp-session-key", "0:8"], "needs UDP listeners"),
            (&["--protocol", "udp", "--udp-migrate-after", "2"], "needs udp-session-key"),
            (
                &["--protocol", "udp", "--udp-session-key", "0:8", "--udp-migrate-after", "0"],
                "from 1 to 1000",
            ),
            (
                &[
                    "--protocol",
                    "both",
                    "--udp-session-key",
                    "0:8",
                    "--accept-proxy",
                    "--trusted-proxies",
                    "10.0.0.0/8",
                ],
                "cannot be used with accept-proxy",
            ),
        ] {
            let e = err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn peers_from_flags() {
        let c = with(&[]).unwrap();
        assert_eq!(c.peers, None);
        assert!(check_name(&c.name).is_ok(), "the host name by default: {}", c.name);
        let c =
            with(&["--name", "a", "--peer", "b=127.0.0.1:7946", "--peer-key-file", "/k"]).unwrap();
        assert_eq!(c.name, "a");
        let peers = c.peers.unwrap();
        assert_eq!(
            peers.peers,
            [Peer { name: "b".into(), addr: "127.0.0.1:7946".parse().unwrap() }]
        );
        assert_eq!((peers.listen, peers.health), (None, PeerHealth::Off));
        let listen = with(&["--peer-listen", "127.0.0.1:7946", "--peer-key-file", "/k"]).unwrap();
        assert_eq!(listen.peers.unwrap().listen, Some("127.0.0.1:7946".parse().unwrap()));
        let remote = ["--peer-listen", "10.0.0.1:7946", "--peer-key-file", "/k"];
        assert!(err(&remote).starts_with("--peer-listen \"10.0.0.1:7946\": not a loopback"));
        let mut allowed = remote.to_vec();
        allowed.push("--peer-allow-remote");
        assert!(with(&allowed).is_ok());
        assert!(err(&["--peer", "b"]).starts_with("--peer \"b\": expected NAME=ADDR"));
        assert!(err(&["--peer", "b=nowhere"]).starts_with("--peer \"b=nowhere\": not an IP:port"));
        assert!(err(&["--peer", "b=127.0.0.1:1"]).starts_with("--peer-key-file: required"));
        assert!(err(&["--name", "a", "--peer", "a=127.0.0.1:1", "--peer-key-file", "/k"])
            .contains("this instance's own name"));
        assert!(err(&["--name", "a b"]).starts_with("--name \"a b\": name"));
        assert!(err(&["--peer-health", "most"]).starts_with("--peer-health \"most\": expected"));
        let quorum =
            ["--peer-health", "quorum", "--peer-listen", "127.0.0.1:1", "--peer-key-file", "/k"];
        assert_eq!(with(&quorum).unwrap().peers.unwrap().health, PeerHealth::Quorum);
    }

    #[test]
    fn connect_from_addresses() {
        let c = with(&["--connect-from", "127.0.0.2", "--connect-from", "::1"]).unwrap();
        let want: Vec<IpAddr> = vec!["127.0.0.2".parse().unwrap(), "::1".parse().unwrap()];
        assert_eq!(c.services[0].connect_from, want);
        assert!(with(&[]).unwrap().services[0].connect_from.is_empty());
        for (flags, want) in [
            (
                &["127.0.0.2:80"][..],
                "--connect-from \"127.0.0.2:80\": expected an IP address without a port",
            ),
            (&["nope"], "--connect-from \"nope\": expected an IP address"),
            (&["0.0.0.0"], "--connect-from \"0.0.0.0\": expected a unicast address"),
            (&["ff02::1"], "--connect-from \"ff02::1\": expected a unicast address"),
            (&["127.0.0.2", "127.0.0.2"], "--connect-from \"127.0.0.2\": given twice"),
            (
                &["::1"],
                "--connect-from: backend 127.0.0.1:2 is IPv4 and no connect-from address is",
            ),
        ] {
            let args: Vec<&str> = flags.iter().flat_map(|f| ["--connect-from", f]).collect();
            let e = err(&args);
            assert!(e.starts_with(want), "{e}");
        }
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
        assert!(err(&["--backend", "127.0.0.1:3,max-conns=0"]).contains("max-conns 0 out of range"));
        assert!(err(&["--user", "root;rm"]).starts_with("--user \"root;rm\": expected NAME"));
        assert!(err(&["--allow", "10.0.0.1/8"]).starts_with("--allow \"10.0.0.1/8\": host bits"));
        assert!(err(&["--deny", "nope"]).starts_with("--deny \"nope\""));
        assert!(err(&["--accept-proxy"]).starts_with("--accept-proxy: needs trusted-proxies"));
        assert!(err(&["--trusted-proxies", "10.0.0.0/8"]).starts_with("--trusted-proxies: needs"));
        assert!(
            err(&["--max-conn-rate-per-source", "-1"]).starts_with("--max-conn-rate-per-source")
        );
        let g = with(&["--deny", "::ffff:10.0.0.0/104", "--max-conns-per-source", "3"]).unwrap();
        assert_eq!(g.services[0].guard.deny[0].to_string(), "10.0.0.0/8");
        assert_eq!(g.services[0].guard.max_conns_per_source, Some(3));
        assert!(err(&["--user", "a:"]).starts_with("--user"));
        assert!(err(&["--admin", "0.0.0.0:1", "--admin-allow-remote"])
            .starts_with("--admin-token-file: required with admin-allow-remote"));
        assert_eq!(
            with(&["--user", "nobody:nogroup"]).unwrap().user,
            Some(UserSpec { user: "nobody".into(), group: Some("nogroup".into()) })
        );
        assert!(err(&["--backend", "127.0.0.1:3,max-conns=x"]).contains("not a whole number"));
        let capped = with(&["--backend", "127.0.0.1:3,max-conns=7"]).unwrap();
        assert_eq!(capped.services[0].backends[1].max_conns.map(|n| n.get()), Some(7));
        assert!(err(&["--backend", "127.0.0.1:2"]).contains("used twice"));
        assert!(err(&["--backend", "127.0.0.1:0"]).contains("port must not be 0"));
        assert!(err(&["--affinity", "cookie"]).starts_with("--affinity \"cookie\""));
        assert!(err(&["--splice", "yes"]).starts_with("--splice"));
        assert!(err(&["--idle-timeout", "10"]).starts_with("--idle-timeout \"10\""));
        assert!(err(&["--connect-timeout", "0s"]).contains("greater than zero"));
        assert!(err(&["--idle-timeout", "9999999999999999h"]).contains("at most a year"));
        assert!(err(&["--grace", "8761h"]).contains("at most a year"));
        assert!(err(&["--upgrade-grace", "2"]).starts_with("--upgrade-grace \"2\""));
        // --upgrade-grace follows --grace unless given.
        assert_eq!(with(&["--grace", "7s"]).unwrap().upgrade_grace, Duration::from_secs(7));
        let both = with(&["--grace", "7s", "--upgrade-grace", "5m"]).unwrap();
        assert_eq!(
            (both.grace, both.upgrade_grace),
            (Duration::from_secs(7), Duration::from_secs(300))
        );
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

    // === --config ===

    const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/tether.example.toml");

    #[test]
    fn config_replaces_the_service_flags() {
        let e = parse(&["--config", EXAMPLE, "--listen", "127.0.0.1:1"]).unwrap_err();
        assert!(e.starts_with("--listen: cannot be combined with --config"), "{e}");
        let e = parse(&["--config", EXAMPLE, "--grace", "1s"]).unwrap_err();
        assert!(e.starts_with("--grace: cannot be combined with --config"), "{e}");
        let c = parse(&["--config", EXAMPLE, "--sticky-prefill", "10"]).unwrap();
        assert_eq!(c.sticky_prefill, 10);
        assert_eq!(c.file.as_deref(), Some(std::path::Path::new(EXAMPLE)));
    }

    #[test]
    fn errors_are_one_line() {
        for e in [err(&["--backend", "x"]), err(&["--grace", "5 parsecs"])] {
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
