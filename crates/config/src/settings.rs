//! Every setting, once: its flag and its config-file key (one name: `sticky_timeout` is
//! `--sticky-timeout` and `sticky-timeout = ...`), its help text, and the shape of its raw
//! value. From this table come the flags ([`Args`]), the config file's tables (`RawFile`,
//! `RawService`), the raw input both turn into (`ServiceInput`, `ProcessInput`), and the list
//! of flags refused beside `--config`. A setting's default and validation are in
//! `build_service` / `build_config`, which the flags and the file share.
//!
//! Shapes: `text` (a string), `duration` (a string such as `"30s"`), `count` (a TOML integer,
//! passed on as its decimal text so that a negative one reaches its own check), `list` (a
//! repeated flag, a TOML array), `switch` (a flag without a value, a TOML boolean).

use argh::FromArgs;
use serde::Deserialize;

use crate::file::{DurationText, RawBackend};

/// The flags: those only the command line has, then one per setting (a switch or an option).
macro_rules! args {
    ([$($done:tt)*]) => {
        /// tether: an L4 TCP/UDP load balancer that pins each client to one backend.
        /// `tether check` with the same flags (or --config FILE) validates them and exits.
        #[derive(FromArgs, Debug, Default)]
        pub struct Args { $($done)* }
    };
    ([$($done:tt)*] $(#[$m:meta])* $name:ident: switch, $($rest:tt)*) => {
        args!([$($done)* $(#[$m])* #[argh(switch)] pub $name: bool,] $($rest)*);
    };
    // argh reads the field's written type (`Vec`, `Option`) to tell a repeated option from an
    // optional one: it is spelled out here, not produced by a macro.
    ([$($done:tt)*] $(#[$m:meta])* $name:ident: list, $($rest:tt)*) => {
        args!([$($done)* $(#[$m])* #[argh(option)] pub $name: Vec<String>,] $($rest)*);
    };
    ([$($done:tt)*] $(#[$m:meta])* $name:ident: $kind:ident, $($rest:tt)*) => {
        args!([$($done)* $(#[$m])* #[argh(option)] pub $name: Option<String>,] $($rest)*);
    };
}

/// A setting's type in the flags and the input structs.
macro_rules! input_type {
    (list) => { Vec<String> };
    (switch) => { bool };
    ($kind:ident) => { Option<String> };
}

/// A setting's type in a config-file table.
macro_rules! raw_type {
    (text) => { Option<String> };
    (duration) => { Option<DurationText> };
    (count) => { Option<i64> };
    (list) => { Vec<String> };
    (switch) => { bool };
}

/// A config-file value as input text.
macro_rules! from_raw {
    (duration, $v:expr) => {
        $v.as_ref().map(|d| d.0.clone())
    };
    (count, $v:expr) => {
        $v.map(|n| n.to_string())
    };
    (switch, $v:expr) => {
        $v
    };
    ($kind:ident, $v:expr) => {
        $v.clone()
    };
}

/// Whether a flag was given.
macro_rules! given {
    (list, $v:expr) => {
        !$v.is_empty()
    };
    (switch, $v:expr) => {
        $v
    };
    ($kind:ident, $v:expr) => {
        $v.is_some()
    };
}

/// One scope's input struct, how the flags and a file table fill it, and its flags given.
macro_rules! input {
    ($(#[$sm:meta])* $ty:ident from $raw:ident { $($(#[$m:meta])* $name:ident: $kind:ident,)* }) => {
        $(#[$sm])*
        #[derive(Debug, Default)]
        pub(crate) struct $ty { $(pub $name: input_type!($kind),)* }

        impl From<&Args> for $ty {
            #[allow(clippy::clone_on_copy)]
            fn from(args: &Args) -> Self {
                $ty { $($name: args.$name.clone(),)* }
            }
        }

        impl $ty {
            /// The settings of a config-file table.
            pub(crate) fn of(raw: &$raw) -> Self {
                $ty { $($name: from_raw!($kind, raw.$name),)* }
            }

            /// The flags of this scope given on the command line, by name.
            pub(crate) fn given(args: &Args) -> Vec<String> {
                let mut given = Vec::new();
                $(if given!($kind, args.$name) {
                    given.push(stringify!($name).replace('_', "-"));
                })*
                given
            }
        }
    };
}

/// Every setting of a service, then every process-wide one, each in its table's order.
macro_rules! settings {
    (
        service { $($(#[$sm:meta])* $sn:ident: $sk:ident,)* }
        process { $($(#[$pm:meta])* $pn:ident: $pk:ident,)* }
        peers { $($(#[$qm:meta])* $qn:ident: $qk:ident,)* }
    ) => {
        args!([
            /// TOML file with one or more services (see docs/configuration.md); replaces the service flags
            #[argh(option)]
            pub config: Option<String>,
            /// address to accept clients on, e.g. 0.0.0.0:5432 or [::]:5432 (repeatable)
            #[argh(option)]
            pub listen: Vec<String>,
            /// backend ADDR[,weight=N][,name=NAME][,max-conns=N]; weight 1..=1000 (default 1), name
            /// defaults to ADDR, max-conns caps its open sessions (repeatable)
            #[argh(option)]
            pub backend: Vec<String>,
            /// benchmark aid: start with N idle sticky entries for documentation addresses
            /// (2001:db8::/32) to measure tether with a large table (default 0)
            #[argh(option)]
            pub sticky_prefill: Option<String>,
        ] $($(#[$sm])* $sn: $sk,)* $($(#[$pm])* $pn: $pk,)* $($(#[$qm])* $qn: $qk,)*);

        input! {
            /// One service's settings as given, before validation: the flags' text, or the
            /// config file's values with integers written in decimal. Both forms go through
            /// `build_service`, so they share every default and every validator.
            ServiceInput from RawService { $($sn: $sk,)* }
        }

        input! {
            /// The process-wide settings as given (see `ServiceInput`), validated by
            /// `build_config`.
            ProcessInput from RawFile { $($pn: $pk,)* }
        }

        input! {
            /// The peers' settings as given (flags, or the file's `[peers]` table under the
            /// same names), validated by `build_peers`.
            PeersInput from RawPeers { $($qn: $qk,)* }
        }

        /// The `[peers]` table as written (its keys are the flags' names).
        #[derive(Debug, Default, Deserialize)]
        #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
        pub(crate) struct RawPeers {
            $(pub(crate) $qn: raw_type!($qk),)*
        }

        /// One `[[service]]` table as written. Counts are TOML integers (`i64`, so that a
        /// negative count reaches the count's own check and its message), durations strings.
        #[derive(Debug, Default, Deserialize)]
        #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
        pub(crate) struct RawService {
            pub(crate) name: Option<String>,
            pub(crate) listen: Vec<String>,
            $(pub(crate) $sn: raw_type!($sk),)*
            pub(crate) backend: Vec<RawBackend>,
        }

        /// The file as written: process-wide settings and the `[[service]]` tables.
        #[derive(Debug, Default, Deserialize)]
        #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
        pub(crate) struct RawFile {
            $(pub(crate) $pn: raw_type!($pk),)*
            pub(crate) peers: RawPeers,
            pub(crate) service: Vec<RawService>,
        }
    };
}

settings! {
    service {
        /// listeners given by --listen take `tcp` (default), `udp` or `both`
        protocol: text,
        /// what pins a client: `source` (client IP, default), `source/24` or `source/24,64` (the
        /// client's IPv4 /24 or IPv6 /64 network: clients behind one carrier-grade NAT or in one
        /// IPv6 /64 share a pin) or `5tuple` (each connection on its own)
        affinity: text,
        /// bounded-load choice for clients without a pin, e.g. 1.25: a new client whose backend
        /// already has more than F x the average load (sessions and flows, by weight) goes to
        /// the next one of its fallback order under it; pinned clients never move (default: off)
        balance_factor: text,
        /// how long a client stays pinned after its last session closes (default 30m)
        sticky_timeout: duration,
        /// most sticky entries kept; new clients past it are served unpinned (default 1000000)
        sticky_capacity: count,
        /// backend connect timeout before the next backend is tried (default 5s)
        connect_timeout: duration,
        /// close a session after this long without traffic either way (default 1h)
        idle_timeout: duration,
        /// how long a UDP flow lives without a datagram either way (default 1m)
        udp_idle_timeout: duration,
        /// seed of the Maglev table: processes with the same seed and pool agree on every client (default 0)
        seed: count,
        /// size of the Maglev table, a prime larger than the backend count (default 65537)
        table_size: count,
        /// active health probe: `tcp` (connect), `udp` (send --health-send, expect --health-expect)
        /// or `off` (default: `udp` if --health-send is given, else `tcp` for TCP services, else off)
        health_check: text,
        /// time between two probes of one backend (default 2s)
        health_interval: duration,
        /// a probe not answered by then failed; at most the interval (default 1s)
        health_timeout: duration,
        /// consecutive good probes that bring a down backend back up (default 2)
        health_rise: count,
        /// consecutive failures, probes or passive, that take a backend down (default 3)
        health_fall: count,
        /// UDP probe payload (text; \xNN escapes allowed)
        health_send: text,
        /// UDP probe: the reply must start with these bytes (text; \xNN escapes; default: any reply)
        health_expect: text,
        /// whether TCP probes send a PROXY header (v2 LOCAL, or v1 `PROXY UNKNOWN`) before closing,
        /// so backends that require one log no error per probe: `on` or `off` (default: on with
        /// --send-proxy)
        health_send_proxy: text,
        /// receive buffer of UDP listener and flow sockets, in bytes (default: the kernel's,
        /// net.core.rmem_default); above net.core.rmem_max it takes root (SO_RCVBUFFORCE)
        udp_rcvbuf: count,
        /// send buffer of UDP listener and flow sockets, in bytes (default: the kernel's)
        udp_sndbuf: count,
        /// UDP: key flows and pins by these payload bytes, OFFSET:LENGTH (e.g. 4:8: a game's
        /// session token, a QUIC connection ID), so a client whose address or port changes keeps
        /// its flow and backend socket; shorter datagrams fall back to the address (default: off)
        udp_session_key: text,
        /// with --udp-session-key, datagrams a new address must send with a flow's key (within
        /// 5s, none coming from the flow's address meanwhile) before the flow moves to it (default 2)
        udp_migrate_after: count,
        /// what happens to a backend's open sessions and flows when it goes down or into maint:
        /// `keep` (default: they run on) or `kill` (reset at once, so clients reconnect elsewhere)
        on_down: text,
        /// allow only clients in this network, e.g. 10.0.0.0/8 or 2001:db8::/32 (repeatable; default:
        /// everyone not denied)
        allow: list,
        /// refuse clients in this network (repeatable; wins over --allow)
        deny: list,
        /// most TCP sessions open at once per client IP (default: no limit)
        max_conns_per_source: count,
        /// most new TCP sessions per second per client IP, as a burst and sustained (default: none)
        max_conn_rate_per_source: count,
        /// most new UDP flows per second per client IP, as a burst and sustained (default: none)
        max_flow_rate_per_source: count,
        /// most client IPs the per-source limits track at once (default 100000)
        tracked_sources: count,
        /// what the per-source limits count by: `address` (default: each client IP) or `prefix`
        /// (the --affinity source/N network: one budget for a whole NAT or /64)
        limit_per: text,
        /// send a PROXY protocol header to backends: `v1` or `v2` (UDP flows always get v2)
        send_proxy: text,
        /// with --send-proxy, put the v2 header on every UDP datagram, not only a flow's first
        send_proxy_every_datagram: switch,
        /// require a PROXY protocol header (v1 or v2) from --trusted-proxies and use its client address
        accept_proxy: switch,
        /// a network of proxies whose PROXY headers are believed (repeatable; needs --accept-proxy)
        trusted_proxies: list,
        /// how long a trusted proxy may take to send its whole header (default 5s)
        proxy_header_timeout: duration,
        /// connect to backends from this local IP (repeatable: used in turn, and the next one when
        /// one runs out of ports toward a backend; default: the kernel's choice)
        connect_from: list,
    }
    process {
        /// admin HTTP address (API, /metrics, status page), e.g. 127.0.0.1:9100 (default: off)
        admin: text,
        /// allow --admin on an address other than loopback (needs --admin-token-file)
        admin_allow_remote: switch,
        /// file holding the admin token: PUT/POST/DELETE need `Authorization: Bearer TOKEN`
        admin_token_file: text,
        /// most admin HTTP connections open at once; more are closed at once (default 64)
        admin_max_conns: count,
        /// how long an admin client may take to send a request head, then its body, and may keep
        /// a connection idle (default 10s)
        admin_timeout: duration,
        /// after binding every listener, run as this user (NAME or NAME:GROUP); needs root
        user: text,
        /// worker threads, one event loop each (default: one per CPU available to the process)
        workers: count,
        /// most concurrent sessions; further clients are refused (default: from the fd limit)
        max_conns: count,
        /// most UDP flows open at once across all workers; new flows past it are dropped
        /// (default: from the fd limit, at most 65536)
        max_flows: count,
        /// byte pump: `auto` (splice(2) through pipes where available) or `off` (userspace copy)
        splice: text,
        /// TCP listening sockets: `shared` (default: one per address, every worker waits on it and
        /// the kernel wakes one that is idle) or `per-worker` (one per worker, SO_REUSEPORT)
        listeners: text,
        /// on SIGTERM/SIGINT, how long open sessions may run before exit (default 30s)
        grace: duration,
        /// after an upgrade, how long the old process serves its open sessions before it exits
        /// (default: --grace)
        upgrade_grace: duration,
        /// file the sticky tables are saved to every --state-interval and at shutdown, and
        /// loaded from at start (default: none, pins live in memory only)
        state_file: text,
        /// how often the sticky tables are saved to --state-file (default 10s)
        state_interval: duration,
        /// UDP flows forwarded in the kernel once established (an eBPF program at tc ingress):
        /// `auto` (default: where the kernel and privileges allow), `on` (required) or `off`
        udp_offload: text,
        /// write a line to stdout per finished TCP session, expired UDP flow and refused client
        /// (default: off)
        log_sessions: switch,
        /// session log lines as `logfmt` (default) or `json`
        log_format: text,
    }
    peers {
        /// this instance's name among its peers (default: the host name)
        name: text,
        /// another instance, NAME=ADDR (its --peer-listen address), to share pins with (repeatable)
        peer: list,
        /// address the peers connect to, e.g. 127.0.0.1:7946; loopback unless --peer-allow-remote
        peer_listen: text,
        /// allow --peer-listen on an address other than loopback
        peer_allow_remote: switch,
        /// file holding the peers' shared key: one line of 64 hex characters (32 random bytes);
        /// required with --peer or --peer-listen
        peer_key_file: text,
        /// share health: `quorum` (a backend counts as down when most peers report it down) or `off` (default)
        peer_health: text,
    }
}
