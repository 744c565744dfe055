//! Per-worker counters. Each worker writes only its own (relaxed atomics, no contention); the
//! control side sums them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
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
        pub struct Snapshot { $($(#[$doc])* pub $name: u64,)* }

        impl Stats {
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl std::ops::AddAssign for Snapshot {
            fn add_assign(&mut self, o: Snapshot) { $(self.$name += o.$name;)* }
        }

        impl Snapshot {
            /// `(name, value)` pairs, for logs and metrics.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters! {
    /// Client connections accepted.
    accepted,
    /// Clients refused because `--max-conns` sessions were open.
    refused_max_conns,
    /// Sessions closed, for any reason.
    closed,
    /// Sessions whose backend connect completed.
    established,
    /// Backend connects refused or failed.
    connect_failures,
    /// Backend connects that timed out.
    connect_timeouts,
    /// Connects retried on another backend after a failure.
    retries,
    /// Clients closed because no backend could take them.
    no_backend,
    /// Connect attempts that found their backend full (`max-conns`) and moved on.
    backend_full,
    /// TCP clients refused by the service's allow/deny rules.
    denied,
    /// PROXY protocol headers sent to backends (TCP sessions and UDP datagrams).
    proxy_headers_sent,
    /// Connections and datagrams from trusted proxies whose header was missing or malformed
    /// (closed or dropped), or that did not send it within the header timeout.
    proxy_header_errors,
    /// TCP clients refused for having `--max-conns-per-source` sessions open.
    source_over_conns,
    /// TCP clients refused (and UDP flows not made) past their per-source rate.
    source_over_rate,
    /// Clients refused because the per-source table was full of busy sources.
    source_table_full,
    /// Bytes moved client -> backend.
    bytes_in,
    /// Bytes moved backend -> client.
    bytes_out,
    /// Resets forwarded from one side to the other.
    resets,
    /// Sessions closed by the idle timeout.
    idle_timeouts,
    /// Sessions and flows ended because their backend went down or into maint (`on-down kill`).
    killed,
    /// Sessions served unpinned because the sticky table was full.
    sticky_full,
    /// accept(2) failures (EMFILE and friends), each followed by a back-off.
    accept_errors,
    /// Clients refused because this host ran out of fds, ports or memory for the backend side.
    local_errors,
    /// Backend connects and new flows that found no free local port toward their backend on
    /// any `connect-from` address (EADDRNOTAVAIL; F13). A TCP client moves on to the next
    /// backend; a datagram is dropped.
    ports_exhausted,
    /// TCP clients reset because this host could not take their session (its sockets could
    /// not be added to the worker's epoll).
    refused_local,
    /// UDP datagrams received from clients.
    datagrams_in,
    /// UDP datagrams sent back to clients.
    datagrams_out,
    /// UDP datagrams dropped, for any of the reasons below.
    datagrams_dropped,
    /// ... because `--max-flows` flows were open (no flow for a new client).
    dropped_max_flows,
    /// ... because no backend of the service could take a new flow.
    dropped_no_backend,
    /// ... because the service's allow/deny rules refuse the client.
    dropped_denied,
    /// ... because the client is past its per-source flow rate (or the table is full).
    dropped_source_limit,
    /// ... because this host had no socket, fd or memory for a new flow.
    dropped_local,
    /// ... because sending to the backend failed (full buffer, unreachable).
    dropped_to_backend,
    /// ... because sending the reply to the client failed (full buffer, unreachable client).
    dropped_to_client,
    /// ... by the kernel, before tether saw them: a listener's or flow's receive buffer was
    /// full (SO_RXQ_OVFL; `--udp-rcvbuf`).
    dropped_kernel,
    /// UDP flows created.
    flows_created,
    /// UDP flows closed by the idle timeout.
    flows_expired,
    /// New UDP flows refused because `--max-flows` flows were open.
    flows_refused,
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
