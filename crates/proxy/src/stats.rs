//! Per-worker counters. Each worker writes only its own (relaxed atomics, no contention); the
//! control side sums them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Where a counter shows in `/metrics`: under a name of its own, and/or as one label value of
/// a family (`tether_sessions_refused_total{reason="denied"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Export {
    /// `name` with `help`, a counter.
    Plain(&'static str, &'static str),
    /// The value of the family's label.
    In(&'static Family, &'static str),
}

/// A counter family whose members are told apart by one label.
#[derive(Debug, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub label: &'static str,
    pub help: &'static str,
}

/// TCP clients turned away, by reason.
pub static REFUSED: Family = Family {
    name: "tether_sessions_refused_total",
    label: "reason",
    help: "TCP clients turned away, by reason: denied (allow/deny), source_conns, source_rate and source_table_full (per-source limits), max_conns, no_backend, local (this host could not take the session)",
};

/// UDP datagrams dropped, by reason.
pub static DROPPED: Family = Family {
    name: "tether_datagrams_dropped_total",
    label: "reason",
    help: "UDP datagrams dropped, by reason: max_flows (no flow at --max-flows), no_backend, denied, source_limit, local (no socket or fd here), to_backend and to_client (send failed), kernel_rcvbuf (the kernel dropped them: a socket's receive buffer was full), migration_pending (from a keyed flow's new address before --udp-migrate-after of them)",
};

/// The families, in the order `/metrics` shows them.
pub static FAMILIES: [&Family; 2] = [&DROPPED, &REFUSED];

/// Every counter is defined once, here: its field in [`Stats`] and [`Counts`], its doc, and
/// where it shows in `/metrics` ([`Export`]); `/metrics` is generated from this table.
macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident => [$($export:expr),* $(,)?]),* $(,)?) => {
        /// Counters of one worker, and its heartbeat.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// When the worker last turned its event loop, in ms of [`crate::Shared::now_ms`].
            pub last_turn_ms: AtomicU64,
            /// When the supervisor last woke the worker, on the same clock.
            pub last_wake_ms: AtomicU64,
        }

        /// A plain copy of [`Stats`], summable across workers.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Counts { $($(#[$doc])* pub $name: u64,)* }

        impl Stats {
            pub fn counts(&self) -> Counts {
                Counts { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl std::ops::AddAssign for Counts {
            fn add_assign(&mut self, o: Counts) { $(self.$name += o.$name;)* }
        }

        impl Counts {
            /// `(name, value)` pairs, for logs.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }

            /// Every counter's value with where it shows in `/metrics`, in definition order.
            pub fn exports(&self) -> Vec<(&'static [Export], u64)> {
                vec![$({
                    const EXPORTS: &[Export] = &[$($export),*];
                    (EXPORTS, self.$name)
                },)*]
            }
        }
    };
}

counters! {
    /// Client connections accepted.
    accepted => [Export::Plain("tether_sessions_accepted_total", "TCP clients accepted")],
    /// Clients refused because `--max-conns` sessions were open.
    refused_max_conns => [
        Export::Plain("tether_sessions_refused_max_conns_total", "clients refused at --max-conns"),
        Export::In(&REFUSED, "max_conns"),
    ],
    /// Sessions closed, for any reason.
    closed => [Export::Plain("tether_sessions_closed_total", "TCP sessions closed")],
    /// Sessions whose backend connect completed.
    established => [
        Export::Plain(
            "tether_sessions_established_total",
            "TCP sessions whose backend connect completed",
        ),
    ],
    /// Backend connects refused or failed.
    connect_failures => [
        Export::Plain("tether_connect_failures_total", "backend connects refused or failed"),
    ],
    /// Backend connects that timed out.
    connect_timeouts => [
        Export::Plain("tether_connect_timeouts_total", "backend connects timed out"),
    ],
    /// Connects retried on another backend after a failure.
    retries => [
        Export::Plain("tether_connect_retries_total", "connects retried on the next backend"),
    ],
    /// Clients closed because no backend could take them.
    no_backend => [
        Export::Plain(
            "tether_sessions_no_backend_total",
            "clients closed because no backend could take them",
        ),
        Export::In(&REFUSED, "no_backend"),
    ],
    /// Connect attempts that found their backend full (`max-conns`) and moved on.
    backend_full => [
        Export::Plain(
            "tether_connects_backend_full_total",
            "connect attempts that found their backend at its max-conns and moved on",
        ),
    ],
    /// TCP clients refused by the service's allow/deny rules.
    denied => [Export::In(&REFUSED, "denied")],
    /// PROXY protocol headers sent to backends (TCP sessions and UDP datagrams).
    proxy_headers_sent => [
        Export::Plain(
            "tether_proxy_headers_sent_total",
            "PROXY protocol headers sent to backends (TCP sessions and UDP datagrams)",
        ),
    ],
    /// Connections and datagrams from trusted proxies whose header was missing or malformed
    /// (closed or dropped), or that did not send it within the header timeout.
    proxy_header_errors => [
        Export::Plain(
            "tether_proxy_header_errors_total",
            "connections closed and datagrams dropped from trusted proxies for a missing, malformed or late PROXY header",
        ),
    ],
    /// TCP clients refused for having `--max-conns-per-source` sessions open.
    source_over_conns => [Export::In(&REFUSED, "source_conns")],
    /// TCP clients refused (and UDP flows not made) past their per-source rate.
    source_over_rate => [Export::In(&REFUSED, "source_rate")],
    /// Clients refused because the per-source table was full of busy sources.
    source_table_full => [Export::In(&REFUSED, "source_table_full")],
    /// Bytes moved client -> backend.
    bytes_in => [Export::Plain("tether_bytes_in_total", "TCP bytes client -> backend")],
    /// Bytes moved backend -> client.
    bytes_out => [Export::Plain("tether_bytes_out_total", "TCP bytes backend -> client")],
    /// Resets forwarded from one side to the other.
    resets => [
        Export::Plain(
            "tether_resets_forwarded_total",
            "resets forwarded from one side to the other",
        ),
    ],
    /// Sessions closed by the idle timeout.
    idle_timeouts => [
        Export::Plain("tether_sessions_idle_timeouts_total", "sessions closed by the idle timeout"),
    ],
    /// Sessions and flows ended because their backend went down or into maint (`on-down kill`).
    killed => [
        Export::Plain(
            "tether_sessions_killed_total",
            "sessions and flows ended because their backend went down or into maint (on-down kill)",
        ),
    ],
    /// Sessions served unpinned because the sticky table was full.
    sticky_full => [
        Export::Plain(
            "tether_sticky_full_total",
            "sessions and flows served unpinned: sticky table full",
        ),
    ],
    /// accept(2) failures (EMFILE and friends), each followed by a back-off.
    accept_errors => [
        Export::Plain(
            "tether_accept_errors_total",
            "accept(2) failures (fd exhaustion and the like)",
        ),
    ],
    /// Clients refused because this host ran out of fds, ports or memory for the backend side.
    local_errors => [
        Export::Plain(
            "tether_local_errors_total",
            "clients refused for lack of local fds, ports or memory",
        ),
    ],
    /// Backend connects and new flows that found no free local port toward their backend on
    /// any `connect-from` address (EADDRNOTAVAIL; F13). A TCP client moves on to the next
    /// backend; a datagram is dropped.
    ports_exhausted => [
        Export::Plain(
            "tether_ports_exhausted_total",
            "backend connects and new flows that found no free local port (F13)",
        ),
    ],
    /// TCP clients reset because this host could not take their session (its sockets could
    /// not be added to the worker's epoll).
    refused_local => [Export::In(&REFUSED, "local")],
    /// UDP datagrams received from clients.
    datagrams_in => [Export::Plain("tether_datagrams_in_total", "UDP datagrams from clients")],
    /// UDP datagrams sent back to clients.
    datagrams_out => [Export::Plain("tether_datagrams_out_total", "UDP datagrams to clients")],
    /// UDP datagrams the offload program carried (both ways; also in datagrams_in/out).
    offloaded_datagrams => [
        Export::Plain(
            "tether_udp_offloaded_datagrams_total",
            "UDP datagrams the offload program forwarded in the kernel, both ways (also counted in tether_datagrams_in_total and _out_total)",
        ),
    ],
    /// UDP flows handed to the offload program.
    flows_offloaded => [
        Export::Plain("tether_flows_offloaded_total", "UDP flows handed to the offload program"),
    ],
    /// UDP datagrams dropped, for any of the reasons below.
    datagrams_dropped => [],
    /// ... because `--max-flows` flows were open (no flow for a new client).
    dropped_max_flows => [Export::In(&DROPPED, "max_flows")],
    /// ... because no backend of the service could take a new flow.
    dropped_no_backend => [Export::In(&DROPPED, "no_backend")],
    /// ... because the service's allow/deny rules refuse the client.
    dropped_denied => [Export::In(&DROPPED, "denied")],
    /// ... because the client is past its per-source flow rate (or the table is full).
    dropped_source_limit => [Export::In(&DROPPED, "source_limit")],
    /// ... because this host had no socket, fd or memory for a new flow.
    dropped_local => [Export::In(&DROPPED, "local")],
    /// ... because sending to the backend failed (full buffer, unreachable).
    dropped_to_backend => [Export::In(&DROPPED, "to_backend")],
    /// ... because sending the reply to the client failed (full buffer, unreachable client).
    dropped_to_client => [Export::In(&DROPPED, "to_client")],
    /// ... by the kernel, before tether saw them: a listener's or flow's receive buffer was
    /// full (SO_RXQ_OVFL; `--udp-rcvbuf`).
    dropped_kernel => [Export::In(&DROPPED, "kernel_rcvbuf")],
    /// ... because they came from a keyed flow's new address before it had sent
    /// `--udp-migrate-after` of them (the flow had not moved to it yet).
    dropped_migration_pending => [Export::In(&DROPPED, "migration_pending")],
    /// UDP datagrams too short to hold their service's session key: routed by address.
    session_key_short => [
        Export::Plain(
            "tether_udp_session_key_short_total",
            "UDP datagrams too short to hold the session key, routed by the client's address instead",
        ),
    ],
    /// Keyed UDP flows moved to a client's new address (`--udp-session-key`).
    flow_migrations => [
        Export::Plain(
            "tether_udp_flow_migrations_total",
            "keyed UDP flows moved to their client's new address",
        ),
    ],
    /// UDP flows created.
    flows_created => [Export::Plain("tether_flows_created_total", "UDP flows created")],
    /// UDP flows closed by the idle timeout.
    flows_expired => [
        Export::Plain("tether_flows_expired_total", "UDP flows ended by the idle timeout"),
    ],
    /// New UDP flows refused because `--max-flows` flows were open.
    flows_refused => [
        Export::Plain("tether_flows_refused_total", "new UDP flows dropped at --max-flows"),
    ],
}

/// A worker whose event loop has not turned for this long after the supervisor woke it is
/// stalled (a healthy one turns within microseconds).
pub const STALLED_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

impl Stats {
    /// How long ago, at `now_ms`, the worker last turned its event loop.
    pub fn loop_age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_turn_ms.load(Relaxed))
    }

    /// Note that the supervisor is about to wake the worker, at `now_ms`.
    pub fn woken(&self, now_ms: u64) {
        // Only the first wake of a wait counts: later ones must not restart the clock.
        if self.last_wake_ms.load(Relaxed) <= self.last_turn_ms.load(Relaxed) {
            self.last_wake_ms.store(now_ms, Relaxed);
        }
    }

    /// Whether, at `now_ms`, the worker has not turned its loop for [`STALLED_AFTER`] since
    /// the supervisor woke it. A worker nobody woke (not started yet, or finished) is not.
    pub fn stalled(&self, now_ms: u64) -> bool {
        let woke = self.last_wake_ms.load(Relaxed);
        self.last_turn_ms.load(Relaxed) < woke
            && now_ms.saturating_sub(woke) >= STALLED_AFTER.as_millis() as u64
    }
}

/// Add one to a counter.
pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// Count a connect or flow that found no local port toward `to`, and say so in the log on the
/// 1st, 2nd, 4th, 8th... time (a shortage lasts, and would otherwise flood the log).
pub(crate) fn ports_exhausted(stats: &Stats, to: std::net::SocketAddr, e: &std::io::Error) {
    let n = stats.ports_exhausted.fetch_add(1, Relaxed) + 1;
    if n.is_power_of_two() {
        log::warn!(
            "no local port toward {to}: {e} ({n} times so far; add connect-from addresses or widen net.ipv4.ip_local_port_range)"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_counter_shows_in_metrics_under_a_name_or_label_of_its_own() {
        let s = Counts::default();
        let (mut names, mut members) = (HashSet::new(), HashSet::new());
        for ((field, _), (exports, _)) in s.fields().into_iter().zip(s.exports()) {
            // The one counter left out is the sum of the `datagrams_dropped` family.
            if exports.is_empty() {
                assert_eq!(field, "datagrams_dropped", "{field} is not in /metrics");
            }
            for export in exports {
                match *export {
                    Export::Plain(name, help) => {
                        assert!(names.insert(name), "{name} twice");
                        assert!(name.starts_with("tether_") && name.ends_with("_total"), "{name}");
                        assert!(!help.is_empty() && !help.ends_with('.'), "{name}: {help:?}");
                    }
                    Export::In(family, member) => {
                        assert!(members.insert((family.name, member)), "{member} twice");
                        assert!(FAMILIES.iter().any(|f| std::ptr::eq(*f, family)));
                    }
                }
            }
        }
        for family in FAMILIES {
            assert!(!names.contains(family.name), "{} is a name and a family", family.name);
        }
    }
}
