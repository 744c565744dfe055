//! The TOML config file (`--config FILE`): several services, each with its listeners, backends
//! and settings. Keys are the flags' names; errors name the key path.
//!
//! The file is read in three steps: TOML syntax (errors give the line and column), shape (serde
//! with `deny_unknown_fields`: unknown keys and wrong types, named by their key path), and
//! meaning, where each service goes through the same builder as the flags (`ServiceInput` in
//! lib.rs), so the two forms share every default and every check.
//!
//! ```
//! let config = tether_config::file::load_str(
//!     r#"
//!     [[service]]
//!     name = "pg"
//!     listen = ["127.0.0.1:5432"]
//!     [[service.backend]]
//!     address = "10.0.0.1:5432"
//!     weight = 2
//!     "#,
//! )
//! .unwrap();
//! assert_eq!(config.services[0].backends[0].weight.get(), 2);
//! ```

use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::settings::{RawFile, RawService};

use crate::{
    add_backend, backend_spec, build_config, build_peers, build_service, check_backend_addr,
    check_backend_max_conns, check_name, check_weight, listen_addrs, BackendSpec, Config,
    ConfigError, Origin, PeersInput, ProcessInput, Service, ServiceInput,
};

/// Read and validate the config file at `path`.
pub fn load_path(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::at(format!("--config {}", path.display()), None, e.to_string())
    })?;
    let mut config = load_str(&text)?;
    config.file = Some(path.to_path_buf());
    Ok(config)
}

/// Validate the text of a config file.
pub fn load_str(text: &str) -> Result<Config, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e| syntax_error(text, &e))?;
    let raw: RawFile =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(shape_error)?;
    Config::try_from(raw)
}

/// One `[[service.backend]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawBackend {
    address: Option<String>,
    weight: Option<i64>,
    name: Option<String>,
    max_conns: Option<i64>,
}

/// A duration as the flags take it (`"30s"`). Its own type only so that a bare number says
/// what is expected: `expected a duration string such as "30s", found integer `30``.
#[derive(Debug)]
pub(crate) struct DurationText(pub(crate) String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl de::Visitor<'_> for Visitor {
            type Value = DurationText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"30s\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
        }

        deserializer.deserialize_str(Visitor)
    }
}

impl TryFrom<RawFile> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawFile) -> Result<Config, ConfigError> {
        if raw.service.is_empty() {
            return Err(ConfigError::at(
                "service",
                None,
                "at least one [[service]] table is required",
            ));
        }
        let input = ProcessInput::of(&raw);
        let peers = build_peers(&Origin::Table("peers".into()), &PeersInput::of(&raw.peers))?;
        let mut services: Vec<Service> = Vec::with_capacity(raw.service.len());
        for (i, service) in raw.service.into_iter().enumerate() {
            let service = file_service(i, service, &services)?;
            services.push(service);
        }
        let mut config = build_config(&Origin::Table(String::new()), &input, services)?;
        (config.name, config.peers) = peers;
        Ok(config)
    }
}

/// Service `i` of the file; `before` are the ones above it, whose names and listen addresses it
/// must not repeat.
fn file_service(i: usize, raw: RawService, before: &[Service]) -> Result<Service, ConfigError> {
    let table = format!("service[{i}]");
    let origin = Origin::Table(table.clone());
    let input = ServiceInput::of(&raw);
    let Some(name) = raw.name else {
        return Err(ConfigError::at(format!("{table}.name"), None, "required"));
    };
    let name_error = |p: String| ConfigError::at(format!("{table}.name"), Some(name.clone()), p);
    check_name(&name).map_err(name_error)?;
    if let Some(j) = before.iter().position(|s| s.name == name) {
        return Err(name_error(format!("also the name of service[{j}]")));
    }
    let listen = listen_addrs(&origin, &raw.listen)?;
    for (k, (addr, text)) in listen.iter().zip(&raw.listen).enumerate() {
        if let Some(other) = before.iter().find(|s| s.listen.contains(addr)) {
            let problem = format!("also a listener of service {:?}", other.name);
            return Err(ConfigError::at(
                format!("{table}.listen[{k}]"),
                Some(text.clone()),
                problem,
            ));
        }
    }
    let mut backends = Vec::with_capacity(raw.backend.len());
    for (j, backend) in raw.backend.into_iter().enumerate() {
        file_backend(&format!("{table}.backend[{j}]"), backend, &mut backends)?;
    }
    build_service(&origin, name, listen, backends, &input)
}

/// Check the backend table at `table` and add it to `backends`.
fn file_backend(
    table: &str,
    raw: RawBackend,
    backends: &mut Vec<BackendSpec>,
) -> Result<(), ConfigError> {
    let at = |key: &str, value: &str, p: String| {
        ConfigError::at(format!("{table}.{key}"), Some(value.to_string()), p)
    };
    let Some(address) = raw.address else {
        return Err(ConfigError::at(format!("{table}.address"), None, "required"));
    };
    let addr = check_backend_addr(&address).map_err(|p| at("address", &address, p))?;
    let weight = match raw.weight {
        None => None,
        Some(w) => Some(check_weight(w).map_err(|p| at("weight", &w.to_string(), p))?),
    };
    if let Some(name) = &raw.name {
        check_name(name).map_err(|p| at("name", name, p))?;
    }
    // Without a name the address is the name, so a clash is the address's.
    let key = if raw.name.is_some() { "name" } else { "address" };
    let mut spec = backend_spec(addr, weight, raw.name);
    if let Some(n) = raw.max_conns {
        let checked = check_backend_max_conns(n).map_err(|p| at("max-conns", &n.to_string(), p))?;
        spec.max_conns = Some(checked);
    }
    let name = spec.name.clone();
    add_backend(backends, spec).map_err(|p| at(key, &name, p))
}

/// A TOML syntax error: `line L, column C` and the parser's message, on one line.
fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let place = match e.span() {
        Some(span) => {
            // Columns count characters, as toml's own report does.
            let (mut line, mut column) = (1, 1);
            for (_, c) in text.char_indices().take_while(|&(i, _)| i < span.start) {
                if c == '\n' {
                    (line, column) = (line + 1, 1);
                } else {
                    column += 1;
                }
            }
            format!("line {line}, column {column}")
        }
        None => "--config".to_string(),
    };
    ConfigError::at(place, None, one_line(e.message()))
}

/// An unknown key or a value of the wrong type, at its key path, with serde's message said in
/// TOML's words: `unknown key (expected one of address, weight, name, max-conns)`, `expected an integer,
/// found string "2"`.
fn shape_error(e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let place = e.path().to_string();
    let message = one_line(e.inner().message());
    let problem = if let Some(rest) = message.strip_prefix("unknown field `") {
        // "unknown field `wieght`, expected one of `address`, `weight`, `name`"
        match rest.split_once(", ") {
            Some((_, expected)) => format!("unknown key ({})", expected.replace('`', "")),
            None => "unknown key".to_string(),
        }
    } else if let Some((found, expected)) =
        message.strip_prefix("invalid type: ").and_then(|m| m.rsplit_once(", expected "))
    {
        format!("expected {}, found {}", toml_words(expected), toml_words(found))
    } else {
        message
    };
    ConfigError::at(place, None, problem)
}

/// serde's name for a kind of value as TOML calls it.
fn toml_words(serde: &str) -> &str {
    match serde {
        "i64" => "an integer",
        "a sequence" => "an array",
        "sequence" => "an array",
        "map" => "a table",
        s if s.starts_with("struct ") => "a table",
        s => s,
    }
}

fn one_line(message: &str) -> String {
    message.trim().lines().map(str::trim).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::num::{NonZeroU32, NonZeroUsize};
    use std::time::Duration;

    use argh::FromArgs;

    use super::*;
    use crate::{Affinity, Args, HealthCheck, HealthConfig, Protocol, Splice};

    /// A file with one service `pg` and one backend: `top` above it, `keys` in the service's
    /// table, `backend` in the backend's table, and `after` at the end.
    fn file(top: &str, keys: &str, backend: &str, after: &str) -> String {
        format!(
            "{top}\n[[service]]\nname = \"pg\"\nlisten = [\"0.0.0.0:5432\"]\n{keys}\n\
             [[service.backend]]\naddress = \"10.0.0.1:5432\"\n{backend}\n{after}"
        )
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn flags(flags: &[&str]) -> Config {
        Config::try_from(Args::from_args(&["tether"], flags).unwrap()).unwrap()
    }

    // === a full file ===

    #[test]
    fn every_key_reaches_the_config() {
        let text = r#"
            admin = "0.0.0.0:9100"
            admin-allow-remote = true
            admin-token-file = "/etc/tether/admin.token"
            admin-max-conns = 8
            admin-timeout = "3s"
            user = "tether:nogroup"
            workers = 2
            max-conns = 10000
            max-flows = 20000
            splice = "off"
            grace = "45s"
            upgrade-grace = "10m"
            state-file = "/var/lib/tether/state"
            state-interval = "5s"
            udp-offload = "off"

            [[service]]
            name = "pg"
            listen = ["0.0.0.0:5432", "[::1]:5433"]
            protocol = "tcp"
            affinity = "5tuple"
            sticky-timeout = "20m"
            sticky-capacity = 5000
            connect-timeout = "3s"
            idle-timeout = "2h"
            udp-idle-timeout = "2m"
            seed = 42
            table-size = 251
            health-check = "tcp"
            health-interval = "3s"
            health-timeout = "2s"
            health-rise = 4
            health-fall = 5
            health-send-proxy = "on"
            on-down = "kill"
            allow = ["10.0.0.0/8", "2001:db8::/32"]
            deny = ["10.9.0.0/16"]
            max-conns-per-source = 20
            max-conn-rate-per-source = 50
            max-flow-rate-per-source = 10
            tracked-sources = 5000
            send-proxy = "v2"
            send-proxy-every-datagram = true
            accept-proxy = true
            trusted-proxies = ["192.0.2.0/24"]
            proxy-header-timeout = "2s"
            connect-from = ["10.0.0.100", "fd00::100"]

            [peers]
            name = "edge-1"
            peer = ["edge-2=10.0.0.2:7946", "edge-3=[fd00::3]:7946"]
            peer-listen = "10.0.0.1:7946"
            peer-allow-remote = true
            peer-key-file = "/etc/tether/peer.key"
            peer-health = "quorum"

            [[service.backend]]
            address = "10.0.0.1:5432"
            weight = 2
            name = "db-1"
            max-conns = 100

            [[service.backend]]
            address = "[fd00::2]:5432"

            [[service]]
            name = "game"
            listen = ["0.0.0.0:7777"]
            protocol = "both"
            udp-rcvbuf = 4194304
            udp-sndbuf = 1048576
            health-send = '\xff\xffping'
            health-expect = "pong"

            [[service.backend]]
            address = "10.0.1.1:7777"
            weight = 1000
        "#;
        let c = load_str(text).unwrap();
        assert_eq!(c.admin, Some(addr("0.0.0.0:9100")));
        assert_eq!(c.admin_token_file, Some("/etc/tether/admin.token".into()));
        assert_eq!(c.admin_max_conns, 8);
        assert_eq!(c.admin_timeout, Duration::from_secs(3));
        let user = crate::UserSpec { user: "tether".into(), group: Some("nogroup".into()) };
        assert_eq!(c.user, Some(user));
        assert_eq!(c.workers, NonZeroUsize::new(2));
        assert_eq!(c.max_conns, NonZeroUsize::new(10_000));
        assert_eq!(c.max_flows, NonZeroUsize::new(20_000));
        assert_eq!(c.splice, Splice::Off);
        assert_eq!(c.grace, Duration::from_secs(45));
        assert_eq!(c.upgrade_grace, Duration::from_secs(600));
        assert_eq!(c.udp_offload, crate::UdpOffload::Off);
        assert_eq!(c.name, "edge-1");
        let peers = c.peers.as_ref().expect("peers");
        let names: Vec<_> = peers.peers.iter().map(|p| (p.name.as_str(), p.addr)).collect();
        assert_eq!(names, [("edge-2", addr("10.0.0.2:7946")), ("edge-3", addr("[fd00::3]:7946"))]);
        assert_eq!(peers.listen, Some(addr("10.0.0.1:7946")));
        assert_eq!(peers.key_file, std::path::PathBuf::from("/etc/tether/peer.key"));
        assert_eq!(peers.health, crate::PeerHealth::Quorum);
        assert_eq!(c.state_file, Some("/var/lib/tether/state".into()));
        assert_eq!(c.state_interval, Duration::from_secs(5));
        assert_eq!(c.sticky_prefill, 0);
        assert_eq!(c.file, None);
        let weight = |w| NonZeroU32::new(w).unwrap();
        let pg = Service {
            name: "pg".into(),
            listen: vec![addr("0.0.0.0:5432"), addr("[::1]:5433")],
            protocol: Protocol::Tcp,
            backends: vec![
                BackendSpec {
                    addr: addr("10.0.0.1:5432"),
                    name: "db-1".into(),
                    weight: weight(2),
                    max_conns: std::num::NonZeroU32::new(100),
                },
                BackendSpec {
                    addr: addr("[fd00::2]:5432"),
                    name: "[fd00::2]:5432".into(),
                    weight: weight(1),
                    max_conns: None,
                },
            ],
            affinity: Affinity::FiveTuple,
            prefix: vocab::Prefix::HOST,
            balance_factor: None,
            sticky_timeout: Duration::from_secs(20 * 60),
            sticky_capacity: 5000,
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(2 * 3600),
            udp_idle_timeout: Duration::from_secs(120),
            udp_session_key: None,
            udp_migrate_after: crate::DEFAULT_UDP_MIGRATE_AFTER,
            udp_rcvbuf: None,
            udp_sndbuf: None,
            seed: 42,
            table_size: 251,
            health: HealthConfig {
                check: HealthCheck::Tcp,
                send_proxy: Some(crate::ProxyVersion::V2),
                interval: Duration::from_secs(3),
                timeout: Duration::from_secs(2),
                rise: 4,
                fall: 5,
                on_down: crate::OnDown::Kill,
            },
            guard: crate::GuardConfig {
                allow: vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()],
                deny: vec!["10.9.0.0/16".parse().unwrap()],
                max_conns_per_source: Some(20),
                conn_rate_per_source: Some(50),
                flow_rate_per_source: Some(10),
                tracked_sources: 5000,
                limit_per_prefix: false,
            },
            proxy: crate::ProxyConfig {
                send: Some(crate::ProxyVersion::V2),
                send_every_datagram: true,
                trusted: vec!["192.0.2.0/24".parse().unwrap()],
                header_timeout: Duration::from_secs(2),
            },
            connect_from: vec!["10.0.0.100".parse().unwrap(), "fd00::100".parse().unwrap()],
        };
        let game = Service {
            name: "game".into(),
            listen: vec![addr("0.0.0.0:7777")],
            protocol: Protocol::Both,
            backends: vec![BackendSpec {
                addr: addr("10.0.1.1:7777"),
                name: "10.0.1.1:7777".into(),
                weight: weight(1000),
                max_conns: None,
            }],
            affinity: Affinity::Source,
            prefix: vocab::Prefix::HOST,
            balance_factor: None,
            sticky_timeout: crate::DEFAULT_STICKY_TIMEOUT,
            sticky_capacity: crate::DEFAULT_STICKY_CAPACITY,
            connect_timeout: crate::DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: crate::DEFAULT_IDLE_TIMEOUT,
            udp_idle_timeout: crate::DEFAULT_UDP_IDLE_TIMEOUT,
            udp_session_key: None,
            udp_migrate_after: crate::DEFAULT_UDP_MIGRATE_AFTER,
            udp_rcvbuf: Some(4_194_304),
            udp_sndbuf: Some(1_048_576),
            seed: 0,
            table_size: crate::DEFAULT_TABLE_SIZE,
            health: HealthConfig {
                check: HealthCheck::Udp {
                    send: b"\xff\xffping".to_vec(),
                    expect: b"pong".to_vec(),
                },
                send_proxy: None,
                interval: crate::DEFAULT_HEALTH_INTERVAL,
                timeout: crate::DEFAULT_HEALTH_TIMEOUT,
                rise: crate::DEFAULT_HEALTH_RISE,
                fall: crate::DEFAULT_HEALTH_FALL,
                on_down: crate::OnDown::Keep,
            },
            guard: crate::GuardConfig {
                allow: Vec::new(),
                deny: Vec::new(),
                max_conns_per_source: None,
                conn_rate_per_source: None,
                flow_rate_per_source: None,
                tracked_sources: crate::DEFAULT_TRACKED_SOURCES,
                limit_per_prefix: false,
            },
            proxy: crate::ProxyConfig {
                send: None,
                send_every_datagram: false,
                trusted: Vec::new(),
                header_timeout: crate::DEFAULT_PROXY_HEADER_TIMEOUT,
            },
            connect_from: Vec::new(),
        };
        assert_eq!(c.services, vec![pg, game]);
    }

    #[test]
    fn the_example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/tether.example.toml");
        let c = load_path(&path).unwrap();
        assert_eq!(c.file.as_deref(), Some(path.as_path()));
        let names: Vec<_> = c.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["pg", "game"]);
        assert_eq!(c.services[0].protocol, Protocol::Tcp);
        assert_eq!(c.services[0].backends.len(), 3);
        assert_eq!(c.services[1].protocol, Protocol::Both);
        assert!(matches!(c.services[1].health.check, HealthCheck::Udp { .. }));
        let key = vocab::SessionKey { offset: 4, len: 8 };
        assert_eq!(
            (c.services[1].udp_session_key, c.services[1].udp_migrate_after),
            (Some(key), 2)
        );
    }

    // === the file and the flags agree ===

    #[test]
    fn defaults_equal_the_flag_form() {
        let from_file = load_str(&file("", "", "", "")).unwrap();
        let from_flags = flags(&["--listen", "0.0.0.0:5432", "--backend", "10.0.0.1:5432"]);
        let mut service = from_flags.services[0].clone();
        service.name = "pg".into();
        assert_eq!(from_file.services, vec![service]);
        assert_eq!(from_file.admin, from_flags.admin);
        assert_eq!(from_file.workers, from_flags.workers);
        assert_eq!(from_file.max_conns, from_flags.max_conns);
        assert_eq!(from_file.max_flows, from_flags.max_flows);
        assert_eq!(from_file.splice, from_flags.splice);
        assert_eq!(from_file.grace, from_flags.grace);
        assert_eq!(from_file.sticky_prefill, from_flags.sticky_prefill);
    }

    #[test]
    fn keys_mean_what_their_flags_mean() {
        // The health probe defaults on the protocol and the payloads in both forms alike.
        let cases: [(&str, &[&str]); 6] = [
            ("protocol = \"udp\"", &["--protocol", "udp"]),
            (
                "protocol = \"both\"\nhealth-send = 'a\\x00'",
                &["--protocol", "both", "--health-send", "a\\x00"],
            ),
            (
                "protocol = \"udp\"\nhealth-check = \"off\"",
                &["--protocol", "udp", "--health-check", "off"],
            ),
            (
                "affinity = \"5tuple\"\nsticky-capacity = 7",
                &["--affinity", "5tuple", "--sticky-capacity", "7"],
            ),
            (
                "send-proxy = \"v1\"\nhealth-send-proxy = \"off\"",
                &["--send-proxy", "v1", "--health-send-proxy", "off"],
            ),
            (
                "protocol = \"udp\"\nudp-rcvbuf = 1\nudp-sndbuf = 65536",
                &["--protocol", "udp", "--udp-rcvbuf", "1", "--udp-sndbuf", "65536"],
            ),
        ];
        for (keys, extra) in cases {
            let from_file = load_str(&file("", keys, "", "")).unwrap();
            let mut args = vec!["--listen", "0.0.0.0:5432", "--backend", "10.0.0.1:5432"];
            args.extend_from_slice(extra);
            let mut service = flags(&args).services.remove(0);
            service.name = "pg".into();
            assert_eq!(from_file.services, vec![service], "{keys}");
        }
    }

    // === errors name the key path ===

    const SECOND: &str = "[[service]]\nname = \"game\"\nlisten = [\"0.0.0.0:7777\"]\n\
                          [[service.backend]]\naddress = \"10.0.1.1:7777\"\n";

    fn load_err(text: &str) -> String {
        match load_str(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    /// (file, what its error starts with).
    fn error_cases() -> Vec<(String, &'static str)> {
        let base = file("", "", "", "");
        let top = |keys: &str| file(keys, "", "", "");
        let service = |keys: &str| file("", keys, "", "");
        let backend = |keys: &str| file("", "", keys, "");
        let second_backend = |keys: &str| file("", "", "", &format!("[[service.backend]]\n{keys}"));
        let second_service = |from: &str, to: &str| file("", "", "", &SECOND.replace(from, to));
        vec![
            // === shape: unknown keys and wrong types ===
            (
                top("wat = 1"),
                "wat: unknown key (expected one of admin, admin-allow-remote, admin-token-file, admin-max-conns, \
                 admin-timeout, user, workers, max-conns, \
                 max-flows, splice, listeners, grace, upgrade-grace, state-file, state-interval, udp-offload, \
                 log-sessions, log-format, peers, service)",
            ),
            (
                file("", "", "", "[peers]\nwat = 1\n"),
                "peers.wat: unknown key (expected one of name, peer, peer-listen, peer-allow-remote, peer-key-file, peer-health)",
            ),
            (file("", "", "", "[peers]\npeer = [\"b\"]\n"), "peers.peer[0] \"b\": expected NAME=ADDR"),
            (
                file("", "", "", "[peers]\nname = \"a\"\npeer = [\"a=127.0.0.1:1\"]\n"),
                "peers.peer[0] \"a=127.0.0.1:1\": \"a\" is this instance's own name",
            ),
            (
                file("", "", "", "[peers]\npeer = [\"b=127.0.0.1:1\", \"b=127.0.0.1:2\"]\n"),
                "peers.peer[1] \"b=127.0.0.1:2\": \"b\" is named twice",
            ),
            (
                file("", "", "", "[peers]\npeer-listen = \"10.0.0.1:7946\"\npeer-key-file = \"k\"\n"),
                "peers.peer-listen \"10.0.0.1:7946\": not a loopback address",
            ),
            (
                file("", "", "", "[peers]\npeer = [\"b=127.0.0.1:1\"]\n"),
                "peers.peer-key-file: required with peers",
            ),
            (
                file("", "", "", "[peers]\npeer-health = \"most\"\n"),
                "peers.peer-health \"most\": expected `quorum` or `off`",
            ),
            (
                service("colour = 1"),
                "service[0].colour: unknown key (expected one of name, listen, protocol,",
            ),
            (
                second_backend("address = \"10.0.0.2:5432\"\nwieght = 2"),
                "service[0].backend[1].wieght: unknown key (expected one of address, weight, name, max-conns)",
            ),
            (
                service("health-rise = \"2\""),
                "service[0].health-rise: expected an integer, found string \"2\"",
            ),
            (
                backend("weight = 1.5"),
                "service[0].backend[0].weight: expected an integer, found floating point `1.5`",
            ),
            (
                service("idle-timeout = 30"),
                "service[0].idle-timeout: expected a duration string such as \"30s\", \
                 found integer `30`",
            ),
            (
                base.replace("[\"0.0.0.0:5432\"]", "\"0.0.0.0:5432\""),
                "service[0].listen: expected an array, found string \"0.0.0.0:5432\"",
            ),
            (top("admin-allow-remote = \"yes\""), "admin-allow-remote: expected a boolean"),
            ("service = 3".into(), "service: expected an array, found integer `3`"),
            ("[service]\nname = \"pg\"".into(), "service: expected an array, found a table"),
            // === negative and zero counts ===
            (
                service("sticky-capacity = -5"),
                "service[0].sticky-capacity \"-5\": expected a whole number greater than zero",
            ),
            (top("workers = -1"), "workers \"-1\": expected a whole number greater than zero"),
            (top("max-conns = 0"), "max-conns \"0\": must be greater than zero"),
            (service("seed = -1"), "service[0].seed \"-1\": expected an unsigned 64-bit integer"),
            (
                service("allow = [\"10.0.0.0/8\", \"10.0.0.1/8\"]"),
                "service[0].allow[1] \"10.0.0.1/8\": host bits set; did you mean 10.0.0.0/8?",
            ),
            (
                service("deny = [\"10.0.0.0/33\"]"),
                "service[0].deny[0] \"10.0.0.0/33\": prefix length 33 is over 32 for IPv4",
            ),
            (
                service("max-conns-per-source = 0"),
                "service[0].max-conns-per-source \"0\": expected a whole number from 1 to 1000000",
            ),
            (service("send-proxy = \"v3\""), "service[0].send-proxy \"v3\": expected `v1` or `v2`"),
            (service("accept-proxy = true"), "service[0].accept-proxy: needs trusted-proxies"),
            (
                service("connect-from = [\"10.0.0.1\", \"10.0.0.1:9\"]"),
                "service[0].connect-from[1] \"10.0.0.1:9\": expected an IP address without a port",
            ),
            (
                service("trusted-proxies = [\"10.0.0.0/8\"]"),
                "service[0].trusted-proxies: needs accept-proxy",
            ),
            (
                service("send-proxy-every-datagram = true"),
                "service[0].send-proxy-every-datagram: needs send-proxy",
            ),
            (
                service("on-down = \"later\""),
                "service[0].on-down \"later\": expected `keep` or `kill`",
            ),
            (
                service("health-fall = -3"),
                "service[0].health-fall \"-3\": expected a whole number from 1 to 100",
            ),
            (service("table-size = -7"), "service[0].table-size \"-7\": expected a whole number"),
            // === addresses ===
            (
                base.replace("\"10.0.0.1:5432\"", "\"10.0.0.1\""),
                "service[0].backend[0].address \"10.0.0.1\": not an IP:port address",
            ),
            (
                base.replace("10.0.0.1:5432", "10.0.0.1:0"),
                "service[0].backend[0].address \"10.0.0.1:0\": backend port must not be 0",
            ),
            (
                base.replace("0.0.0.0:5432", "localhost:5432"),
                "service[0].listen[0] \"localhost:5432\": not an IP:port address",
            ),
            (
                base.replace("\"0.0.0.0:5432\"", "\"0.0.0.0:1\", \"0.0.0.0:1\""),
                "service[0].listen[1] \"0.0.0.0:1\": given twice",
            ),
            (
                second_service("0.0.0.0:7777", "0.0.0.0:5432"),
                "service[1].listen[0] \"0.0.0.0:5432\": also a listener of service \"pg\"",
            ),
            // === weights ===
            (backend("weight = 0"), "service[0].backend[0].weight \"0\": out of range 1..=1000"),
            (backend("weight = 1001"), "service[0].backend[0].weight \"1001\": out of range"),
            (backend("weight = -2"), "service[0].backend[0].weight \"-2\": out of range"),
            // === durations ===
            (service("idle-timeout = \"10\""), "service[0].idle-timeout \"10\": missing unit"),
            (
                service("connect-timeout = \"0s\""),
                "service[0].connect-timeout \"0s\": must be greater than zero",
            ),
            (top("grace = \"8761h\""), "grace \"8761h\": must be at most a year"),
            // === words and sizes ===
            (service("protocol = \"sctp\""), "service[0].protocol \"sctp\": expected `tcp`,"),
            (service("affinity = \"cookie\""), "service[0].affinity \"cookie\": expected `source`"),
            (top("splice = \"yes\""), "splice \"yes\": expected `auto` or `off`"),
            (service("table-size = 65536"), "service[0].table-size \"65536\": must be a prime"),
            // === names ===
            (base.replace("name = \"pg\"\n", ""), "service[0].name: required"),
            (base.replace("\"pg\"", "\"p g\""), "service[0].name \"p g\": name \"p g\" may only"),
            (second_service("game", "pg"), "service[1].name \"pg\": also the name of service[0]"),
            (
                file(
                    "",
                    "",
                    "name = \"db\"",
                    "[[service.backend]]\naddress = \"10.0.0.2:1\"\nname = \"db\"",
                ),
                "service[0].backend[1].name \"db\": backend name \"db\" is used twice",
            ),
            (
                second_backend("address = \"10.0.0.1:5432\""),
                "service[0].backend[1].address \"10.0.0.1:5432\": backend name \"10.0.0.1:5432\" \
                 is used twice",
            ),
            (backend("name = \"\""), "service[0].backend[0].name \"\": name must be 1 to 128"),
            // === required tables and keys ===
            (String::new(), "service: at least one [[service]] table is required"),
            ("workers = 2\n".into(), "service: at least one [[service]] table is required"),
            (
                "[[service]]\nname = \"pg\"\nlisten = [\"0.0.0.0:1\"]\n".into(),
                "service[0].backend: at least one backend is required",
            ),
            (
                base.replace("[\"0.0.0.0:5432\"]", "[]"),
                "service[0].listen: at least one listen address is required",
            ),
            (
                base.replace("listen = [\"0.0.0.0:5432\"]", ""),
                "service[0].listen: at least one listen address is required",
            ),
            (second_backend("weight = 2"), "service[0].backend[1].address: required"),
            // === health ===
            (
                service("health-timeout = \"3s\""),
                "service[0].health-timeout \"3s\": must be at most the interval (2s)",
            ),
            (
                service("health-interval = \"500ms\""),
                "service[0].health-timeout \"1s\": must be at most the interval (500ms)",
            ),
            (
                service("health-check = \"udp\""),
                "service[0].health-send: a UDP probe needs a payload to send",
            ),
            (
                service("health-check = \"tcp\"\nhealth-send = \"x\""),
                "service[0].health-send: only a `udp` probe sends a payload, not `tcp`",
            ),
            (service("health-check = \"icmp\""), "service[0].health-check \"icmp\": expected"),
            (
                service("health-send = '\\xZZ'"),
                "service[0].health-send \"\\\\xZZ\": \\x needs two hex digits",
            ),
            (service("health-rise = 101"), "service[0].health-rise \"101\": expected a whole"),
            // === admin ===
            (top("admin = \"0.0.0.0:9100\""), "admin \"0.0.0.0:9100\": not a loopback address"),
            (top("admin = \"9100\""), "admin \"9100\": not an IP:port address"),
            (top("admin-max-conns = 0"), "admin-max-conns \"0\": expected a whole number from 1"),
            (top("state-file = \"\""), "state-file \"\": expected a file path"),
            (top("state-interval = \"0s\""), "state-interval \"0s\": "),
            (top("admin-timeout = \"0s\""), "admin-timeout \"0s\": "),
            // === health probes' PROXY header, UDP buffers ===
            (
                service("health-send-proxy = \"on\""),
                "service[0].health-send-proxy \"on\": needs send-proxy",
            ),
            (
                service("health-send-proxy = \"yes\""),
                "service[0].health-send-proxy \"yes\": expected `on` or `off`",
            ),
            (
                service("udp-rcvbuf = 4194304"),
                "service[0].udp-rcvbuf \"4194304\": needs UDP listeners",
            ),
            (
                service("protocol = \"udp\"\nudp-sndbuf = 0"),
                "service[0].udp-sndbuf \"0\": expected a whole number of bytes from 1 to",
            ),
            (
                service("protocol = \"udp\"\nudp-rcvbuf = 2147483648"),
                "service[0].udp-rcvbuf \"2147483648\": expected a whole number of bytes",
            ),
            // === TOML syntax: line and column, then the parser's message ===
            (
                "workers = 2\n[[service]]\nname = pg\n".into(),
                "line 3, column 8: invalid string; expected `\"`, `'`",
            ),
            ("[a b]\n".into(), "line 1, column 4: invalid table header; expected `.`, `]`"),
            ("[[service]]\nname = \"a\"\nname = \"b\"\n".into(), "line 3, column 1: duplicate key"),
            ("grace = \"30s\nworkers = 2\n".into(), "line 1, column 13: invalid basic string"),
            (
                "[[service]]\nhealth-send = \"\\xff\"\n".into(),
                "line 2, column 18: invalid escape sequence",
            ),
        ]
    }

    #[test]
    fn every_error_names_its_place() {
        let mut wrong = Vec::new();
        for (text, expected) in error_cases() {
            let e = load_err(&text);
            if !e.starts_with(expected) {
                wrong.push(format!("got    {e}\nwanted {expected}...\nfrom\n{text}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    }

    #[test]
    fn errors_are_one_line() {
        for (text, _) in error_cases() {
            let e = load_err(&text);
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn remote_admin_needs_the_key() {
        let remote = "admin = \"0.0.0.0:9100\"\nadmin-allow-remote = true";
        let e = load_str(&file(remote, "", "", "")).unwrap_err().to_string();
        assert!(e.starts_with("admin-token-file: required with admin-allow-remote"), "{e}");
        let with_token = format!("{remote}\nadmin-token-file = \"/run/t\"");
        let c = load_str(&file(&with_token, "", "", "")).unwrap();
        assert_eq!(c.admin, Some(addr("0.0.0.0:9100")));
        assert_eq!(c.admin_token_file.as_deref(), Some(std::path::Path::new("/run/t")));
    }

    #[test]
    fn an_unreadable_file_names_its_path() {
        let e = load_path(Path::new("/nonexistent/tether.toml")).unwrap_err().to_string();
        assert!(e.starts_with("--config /nonexistent/tether.toml: "), "{e}");
    }
}
