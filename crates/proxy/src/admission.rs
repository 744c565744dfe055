//! Which backend a client gets, or why it is refused: the one admission path of TCP sessions
//! and UDP flows.
//!
//! In order, and before any socket toward a backend exists: the service's access rules, the
//! per-source limit of the transport (open sessions and their rate for TCP, the flow rate for
//! UDP), the affinity key and its hash, then the sticky entry when its backend may keep its
//! clients, else the first usable backend of the key's fallback order. A TCP session then walks
//! that order ([`Admitted::next`]) taking a place under each backend's `max-conns` as it tries
//! it; a flow takes the first backend.
//!
//! [`ConnectError`] says, for a connect that failed, which side is to blame and whether another
//! backend should be tried, so that no caller reads errno.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;

use conntrack::AffinityKey;

use crate::routing::five_tuple;
use crate::stats::Stats;
use crate::Snapshot;

/// Most backends one client is tried on before it is turned away.
pub const MAX_TRIES: usize = 8;

/// How a client came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    /// The IP protocol number, the first byte of a 5-tuple key.
    fn protocol(self) -> u8 {
        match self {
            Transport::Tcp => 6,
            Transport::Udp => 17,
        }
    }
}

/// Why a client was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The service's allow/deny rules.
    Denied,
    /// Past a per-source limit, or the limiter's table is full of busy sources.
    Source(guard::Verdict),
    /// No backend of the service may take it.
    NoBackend,
}

impl Refusal {
    /// The session log's word for it.
    pub fn end(self) -> crate::sessionlog::End {
        use crate::sessionlog::End;
        match self {
            Refusal::Denied => End::Denied,
            Refusal::Source(_) => End::Limited,
            Refusal::NoBackend => End::NoBackend,
        }
    }

    /// The counter a refusal of `transport` is counted in.
    pub fn counter(self, transport: Transport, stats: &Stats) -> &AtomicU64 {
        use guard::Verdict;
        match (transport, self) {
            (Transport::Tcp, Refusal::Denied) => &stats.denied,
            (Transport::Tcp, Refusal::Source(Verdict::OverConns)) => &stats.source_over_conns,
            (Transport::Tcp, Refusal::Source(Verdict::OverConnRate | Verdict::OverFlowRate)) => {
                &stats.source_over_rate
            }
            (Transport::Tcp, Refusal::Source(Verdict::TableFull | Verdict::Allow)) => {
                &stats.source_table_full
            }
            (Transport::Tcp, Refusal::NoBackend) => &stats.no_backend,
            (Transport::Udp, Refusal::Denied) => &stats.dropped_denied,
            (Transport::Udp, Refusal::Source(_)) => &stats.dropped_source_limit,
            (Transport::Udp, Refusal::NoBackend) => &stats.dropped_no_backend,
        }
    }
}

/// A client let in: what pins it, and where it goes.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The sticky key (source affinity), or `None` (5-tuple affinity: nothing is pinned).
    pub key: Option<AffinityKey>,
    /// The key's hash: the table's fallback order follows it.
    pub hash: u64,
    /// The per-source limiter counts this TCP session: give it back with
    /// `Limiter::close_session` when the session ends (UDP flows only count toward a rate).
    pub limited: bool,
    /// The backend to try first: the pinned one, else the first usable one of the order.
    pub first: usize,
    /// Backends tried so far, in order.
    pub tried: Tried,
    /// The client came with a sticky pin that decided its first backend.
    pub pinned: bool,
    /// What the per-source limiter counted this client as: its address, or its affinity
    /// network with `--limit-per prefix`. The session gives its count back under it.
    pub limit_ip: IpAddr,
}

/// Let `source` (the real client: the peer, or what a trusted proxy's header said) in to
/// `service`, having connected to `destination`, or say why not.
pub fn admit(
    service: &Snapshot,
    transport: Transport,
    source: SocketAddr,
    destination: SocketAddr,
    now_ms: u64,
) -> Result<Admitted, Refusal> {
    admit_as(service, transport, source, destination, None, now_ms)
}

/// [`admit`], with `session` (a UDP session key's [`AffinityKey::from_session`]) as the sticky
/// key and hash in place of what the service's affinity makes of `source`. The access rules and
/// per-source limits still judge `source`.
pub fn admit_as(
    service: &Snapshot,
    transport: Transport,
    source: SocketAddr,
    destination: SocketAddr,
    session: Option<AffinityKey>,
    now_ms: u64,
) -> Result<Admitted, Refusal> {
    if !service.guards.acl.allows(source.ip()) {
        return Err(Refusal::Denied);
    }
    let mut limited = false;
    let limit_ip = if service.settings.limit_per_prefix {
        service.settings.prefix.network(source.ip())
    } else {
        source.ip()
    };
    if let Some(limiter) = &service.guards.limiter {
        let verdict = match transport {
            Transport::Tcp => limiter.open_session(limit_ip, now_ms),
            Transport::Udp => limiter.open_flow(limit_ip, now_ms),
        };
        if verdict != guard::Verdict::Allow {
            return Err(Refusal::Source(verdict));
        }
        limited = transport == Transport::Tcp;
    }
    let (key, hash) = match (session, service.settings.affinity) {
        (Some(key), _) => (Some(key), service.hash_key(&key.to_bytes())),
        (None, vocab::Affinity::Source) => {
            let key = AffinityKey::from_ip_prefix(source.ip(), service.settings.prefix);
            (Some(key), service.hash_key(&key.to_bytes()))
        }
        (None, vocab::Affinity::FiveTuple) => {
            (None, service.hash_key(&five_tuple(transport.protocol(), source, destination)))
        }
    };
    // A sticky entry wins over the table while its backend may keep its clients.
    let pinned = key
        .and_then(|k| service.sticky.lookup(k, now_ms))
        .and_then(|id| service.pinned(id, now_ms));
    let was_pinned = pinned.is_some();
    match pinned.or_else(|| service.choose(hash, now_ms, |_| false)) {
        Some(first) => Ok(Admitted {
            key,
            hash,
            limited,
            first,
            tried: Tried::default(),
            pinned: was_pinned,
            limit_ip,
        }),
        None => {
            if let (true, Some(limiter)) = (limited, &service.guards.limiter) {
                limiter.close_session(limit_ip, now_ms);
            }
            Err(Refusal::NoBackend)
        }
    }
}

impl Admitted {
    /// The next backend to try: the first one, then the next usable one of the fallback order
    /// not tried yet; `None` when [`MAX_TRIES`] were tried or none is left. Each one returned
    /// counts as tried.
    pub fn next(&mut self, service: &Snapshot, now_ms: u64) -> Option<usize> {
        if self.tried.len() >= MAX_TRIES {
            return None;
        }
        let next = if self.tried.is_empty() {
            Some(self.first)
        } else {
            service.choose(self.hash, now_ms, |i| self.tried.contains(i))
        }?;
        self.tried.push(next);
        Some(next)
    }
}

/// Backends already tried for one client.
#[derive(Debug, Default, Clone)]
pub struct Tried {
    ids: [u32; MAX_TRIES],
    len: usize,
}

impl Tried {
    pub fn push(&mut self, id: usize) {
        if self.len < MAX_TRIES {
            self.ids[self.len] = id as u32;
            self.len += 1;
        }
    }

    pub fn contains(&self, id: usize) -> bool {
        self.ids[..self.len].contains(&(id as u32))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why a connect toward a backend failed, which side is to blame, and what follows
/// (pingora-error's `ErrorSource` and `RetryType`, in one enum).
#[derive(Debug)]
pub enum ConnectError {
    /// This host ran out of fds or memory: no other backend would do better and none is to
    /// blame. Accepting should pause until resources come back (FAILURE-MODES F3).
    Local(io::Error),
    /// No local port is left toward this backend from any `connect-from` address (F13):
    /// another backend may have some, and this one is not to blame.
    NoPort(io::Error),
    /// The backend refused, is unreachable or timed out: it is marked failing, and the next
    /// backend is tried.
    Backend(io::Error),
    /// Something about this one attempt: the next backend is tried, no one is blamed.
    Attempt(io::Error),
}

impl ConnectError {
    /// Sort an error from socket(2), bind(2) or connect(2) (or `SO_ERROR` after it).
    pub fn new(e: io::Error) -> ConnectError {
        use nix::libc::{
            EADDRINUSE, EADDRNOTAVAIL, ECONNREFUSED, ECONNRESET, EHOSTUNREACH, EMFILE, ENETUNREACH,
            ENFILE, ENOBUFS, ENOMEM, ETIMEDOUT,
        };
        match e.raw_os_error() {
            Some(EMFILE | ENFILE | ENOBUFS | ENOMEM) => ConnectError::Local(e),
            Some(EADDRNOTAVAIL | EADDRINUSE) => ConnectError::NoPort(e),
            Some(ECONNREFUSED | ECONNRESET | EHOSTUNREACH | ENETUNREACH | ETIMEDOUT) => {
                ConnectError::Backend(e)
            }
            _ => ConnectError::Attempt(e),
        }
    }

    /// Whether another backend should be tried.
    pub fn retry(&self) -> bool {
        !matches!(self, ConnectError::Local(_))
    }

    /// Whether the backend is to blame (a passive health failure).
    pub fn blames_backend(&self) -> bool {
        matches!(self, ConnectError::Backend(_))
    }

    pub fn io(&self) -> &io::Error {
        match self {
            ConnectError::Local(e)
            | ConnectError::NoPort(e)
            | ConnectError::Backend(e)
            | ConnectError::Attempt(e) => e,
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self.io(), f)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    use conntrack::{Sticky, StickyConfig};
    use health::{AdminState, Health};

    use super::*;
    use crate::routing::{BackendState, Guards, Settings};

    fn addr(last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)), port)
    }

    fn service(n: usize, affinity: vocab::Affinity, guards: Guards) -> Snapshot {
        let backends = (0..n)
            .map(|i| {
                let b = BackendState::new(i as u32, format!("b{i}"), addr(100 + i as u8, 5432));
                (Arc::new(b), 1)
            })
            .collect();
        let minute = std::time::Duration::from_secs(60);
        let settings = Settings { affinity, ..Settings::basic(minute, minute) };
        let sticky =
            Arc::new(Sticky::new(StickyConfig { capacity: 100, timeout_ms: 1000 }, [7; 16]));
        Snapshot::new("s".into(), 0, settings, backends, 101, 0, sticky, guards).unwrap()
    }

    fn limiter(max_conns: u32) -> Arc<guard::Limiter> {
        Arc::new(guard::Limiter::new(
            guard::LimitConfig {
                max_conns: Some(max_conns),
                conn_rate: None,
                flow_rate: Some(1),
                capacity: 10,
            },
            [1; 16],
        ))
    }

    const DST: u16 = 5432;

    #[test]
    fn tcp_and_udp_of_one_client_get_the_same_backend() {
        let s = service(5, vocab::Affinity::Source, Guards::default());
        for last in 1..50 {
            let tcp = admit(&s, Transport::Tcp, addr(last, 1000), addr(1, DST), 0).unwrap();
            let udp = admit(&s, Transport::Udp, addr(last, 2000), addr(1, DST), 0).unwrap();
            assert_eq!((tcp.first, tcp.hash), (udp.first, udp.hash), "client {last}");
            assert!(tcp.key.is_some());
        }
    }

    #[test]
    fn a_pin_wins_over_the_table_while_its_backend_may_keep_it() {
        let s = service(3, vocab::Affinity::Source, Guards::default());
        let client = addr(9, 1000);
        let table = admit(&s, Transport::Tcp, client, addr(1, DST), 0).unwrap();
        let other = (table.first + 1) % 3;
        s.sticky.attach(table.key.unwrap(), s.backends[other].id, 0);
        assert_eq!(admit(&s, Transport::Udp, client, addr(1, DST), 0).unwrap().first, other);
        // Draining keeps its pinned clients; maintenance and down do not.
        s.backends[other].set_admin(AdminState::Drain);
        assert_eq!(admit(&s, Transport::Tcp, client, addr(1, DST), 0).unwrap().first, other);
        s.backends[other].set_admin(AdminState::Maint);
        assert_eq!(admit(&s, Transport::Tcp, client, addr(1, DST), 0).unwrap().first, table.first);
        s.backends[other].set_admin(AdminState::Ready);
        s.backends[other].set_health(Health::Down);
        assert_eq!(admit(&s, Transport::Tcp, client, addr(1, DST), 0).unwrap().first, table.first);
    }

    #[test]
    fn refusals_in_order_each_counted_per_transport() {
        let acl = guard::Acl::new(Vec::new(), vec!["192.0.2.66/32".parse().unwrap()]);
        let guards = Guards { acl: Arc::new(acl), limiter: Some(limiter(1)), ..Guards::default() };
        let s = service(2, vocab::Affinity::Source, guards);
        let stats = Stats::default();
        let denied = admit(&s, Transport::Tcp, addr(66, 1), addr(1, DST), 0).unwrap_err();
        assert_eq!(denied, Refusal::Denied);
        // One session per source: the second is over the limit until the first closes.
        let first = admit(&s, Transport::Tcp, addr(5, 1), addr(1, DST), 0).unwrap();
        assert!(first.limited);
        let over = admit(&s, Transport::Tcp, addr(5, 2), addr(1, DST), 0).unwrap_err();
        assert_eq!(over, Refusal::Source(guard::Verdict::OverConns));
        s.guards.limiter.as_ref().unwrap().close_session(addr(5, 1).ip(), 0);
        assert!(admit(&s, Transport::Tcp, addr(5, 3), addr(1, DST), 0).is_ok());
        // UDP: one new flow per second.
        let flow = admit(&s, Transport::Udp, addr(6, 1), addr(1, DST), 0).unwrap();
        assert!(!flow.limited, "a flow holds no session count");
        let fast = admit(&s, Transport::Udp, addr(6, 2), addr(1, DST), 0).unwrap_err();
        assert!(matches!(fast, Refusal::Source(_)));
        for (refusal, tcp, udp) in [
            (Refusal::Denied, &stats.denied, &stats.dropped_denied),
            (over, &stats.source_over_conns, &stats.dropped_source_limit),
            (Refusal::NoBackend, &stats.no_backend, &stats.dropped_no_backend),
        ] {
            assert!(std::ptr::eq(refusal.counter(Transport::Tcp, &stats), tcp));
            assert!(std::ptr::eq(refusal.counter(Transport::Udp, &stats), udp));
        }
    }

    #[test]
    fn no_backend_gives_the_session_count_back() {
        let guards = Guards { limiter: Some(limiter(1)), ..Guards::default() };
        let s = service(1, vocab::Affinity::Source, guards);
        s.backends[0].set_admin(AdminState::Maint);
        for port in 1..4 {
            let refused = admit(&s, Transport::Tcp, addr(5, port), addr(1, DST), 0).unwrap_err();
            assert_eq!(refused, Refusal::NoBackend, "attempt {port}: the count leaked");
        }
    }

    #[test]
    fn the_walk_tries_each_backend_once_and_at_most_max_tries() {
        let s = service(12, vocab::Affinity::FiveTuple, Guards::default());
        let mut a = admit(&s, Transport::Tcp, addr(5, 1), addr(1, DST), 0).unwrap();
        assert!(a.key.is_none());
        let mut seen = Vec::new();
        while let Some(i) = a.next(&s, 0) {
            assert!(!seen.contains(&i), "{i} tried twice");
            seen.push(i);
        }
        assert_eq!(seen.len(), MAX_TRIES);
        assert_eq!(seen[0], a.first);
    }

    #[test]
    fn connect_errors_say_who_is_to_blame_and_whether_to_retry() {
        use nix::libc;
        let sort = |errno| ConnectError::new(io::Error::from_raw_os_error(errno));
        for (errno, retry, blame) in [
            (libc::EMFILE, false, false),
            (libc::ENOBUFS, false, false),
            (libc::EADDRNOTAVAIL, true, false),
            (libc::ECONNREFUSED, true, true),
            (libc::ETIMEDOUT, true, true),
            (libc::EACCES, true, false),
        ] {
            let e = sort(errno);
            assert_eq!((e.retry(), e.blames_backend()), (retry, blame), "{e}");
        }
    }
}
